"""`rwkv-convert release`: a release file over two fixture versions built, verified in each artifact's runtime
and reported three ways; up-to-date keys, truncation, tolerance failures, interrupts, shards."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from rwkv_convert import release
from rwkv_convert.fixtures import fixture_path

from .test_cli import assert_one_line_error, cli

HAVE_LLAMA = os.environ.get("RWKV_CONVERT_REQUIRE_LLAMA") == "1" or importlib.util.find_spec("llama_cpp") is not None

ARTIFACTS = [  # (source, to, layout, options)
    ("v6", "pip", None, {"strategy": "cpu fp32i8"}),
    ("v6", "safetensors", "web-rwkv", {}),
    ("v6", "safetensors", "prepared", {"strategy": "cpu fp16"}),
    ("v6", "onnx", None, {}),
    ("v7", "safetensors", "hf", {}),
    ("v7", "safetensors", "prepared", {"strategy": "cpu fp32i8"}),
    ("v7", "onnx", None, {"onnx-quant": "int8"}),
]
GGUF_ARTIFACTS = [("v6", "gguf", None, {"quant": "q8_0"}), ("v7", "gguf", None, {"quant": "f16"}),
                  ("v7", "gguf", None, {"quant": "q4_0"})]


def release_file(directory: Path, fixture_dir, tolerance: dict | None = None) -> Path:
    """Ten artifacts of a v6 and a v7 fixture (seven where llama.cpp is not installed and not required)."""
    lines = ["[release]", 'title = "fixtures"', "tokens = 24", "", "[sources]",
             f'v6 = "{fixture_path("v6", directory=fixture_dir).as_posix()}"',
             f'v7 = "{fixture_path("v7", directory=fixture_dir).as_posix()}"']
    for n, (source, to, layout, options) in enumerate(ARTIFACTS + (GGUF_ARTIFACTS if HAVE_LLAMA else [])):
        name = f"{source}-{layout or to}-{n}"
        lines += ["", "[[artifact]]", f'name = "{name}"', f'source = "{source}"', f'to = "{to}"']
        lines += [f'layout = "{layout}"'] if layout else []
        lines += [f'{k} = "{v}"' for k, v in options.items()]
        if tolerance and name in tolerance:
            lines.append("tolerance = {" + ", ".join(f"{k} = {v}" for k, v in tolerance[name].items()) + "}")
    path = directory / "release.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def without_run(report: dict) -> dict:
    report = copy.deepcopy(report)
    report.pop("run")
    return report


def read_report(out: Path, stem: str = release.REPORT_NAME) -> dict:
    return json.loads((out / f"{stem}.json").read_text())


@pytest.fixture(scope="module")
def built(tmp_path_factory, fixture_dir):
    """One uninterrupted release of the fixtures' file, with two workers."""
    root = tmp_path_factory.mktemp("release")
    spec = release_file(root, fixture_dir)
    out = root / "out"
    proc = cli("release", spec, "--out", out, "--jobs", "2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return spec, out, proc


def test_a_release_of_two_versions_is_built_verified_and_reported_three_ways(built):
    spec, out, proc = built
    report = read_report(out)
    names = [a.name for a in release.parse_release(spec).artifacts]
    assert len(names) >= (10 if HAVE_LLAMA else 7)
    assert [e["name"] for e in report["artifacts"]] == names
    assert report["summary"] == {"artifacts": len(names), "passed": len(names), "failed": 0, "error": 0}
    assert sorted(report["run"]["built"]) == sorted(names) == sorted(report["run"]["verified"])
    runtimes = {e["name"]: e["runtime"] for e in report["artifacts"]}
    assert runtimes["v6-pip-0"].startswith("rwkv pip package")  # each in its own runtime
    assert "onnxruntime" in runtimes["v6-onnx-3"] and "onnxruntime" in runtimes["v7-onnx-6"]
    if HAVE_LLAMA:
        assert all("llama.cpp" in runtimes[n] for n in names if "gguf" in n)
    for e in report["artifacts"]:
        assert e["bytes"] == sum((out / f["path"]).stat().st_size for f in e["files"]) > 0
        assert 0 < e["bytes_per_param"] < 5 and e["metrics"]["top1"] > 0 and e["status"] == "passed"
    # JUnit: one test case per artifact, none failed
    suites = ET.parse(out / "release-report.xml").getroot()
    cases = suites.findall("./testsuite/testcase")
    assert [c.get("name") for c in cases] == names
    assert not suites.findall(".//failure") and not suites.findall(".//error")
    assert suites.find("testsuite").get("tests") == str(len(names))
    # Markdown: a row per artifact for a model card
    md = (out / "release-report.md").read_text()
    assert all(f"| {n} |" in md for n in names) and "bytes/param" in md
    assert "verified" in proc.stdout and not list(out.rglob("*.rwkv-tmp*"))


def test_an_up_to_date_release_builds_nothing_and_a_truncated_artifact_is_rebuilt_alone(built, tmp_path):
    spec, out, _ = built
    copy_out = tmp_path / "out"
    shutil.copytree(out, copy_out)
    proc = cli("release", spec, "--out", copy_out, "--json")
    assert proc.returncode == 0, proc.stderr
    again = json.loads(proc.stdout)  # --json: the report alone on stdout
    assert again["run"]["built"] == [] and again["run"]["verified"] == []
    assert without_run(again) == without_run(read_report(out))

    victim = next(e for e in again["artifacts"] if e["name"] == "v6-web-rwkv-1")
    path = copy_out / victim["files"][0]["path"]
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    proc = cli("release", spec, "--out", copy_out, "--json")
    assert proc.returncode == 0, proc.stderr
    rebuilt = json.loads(proc.stdout)
    assert rebuilt["run"]["built"] == ["v6-web-rwkv-1"] == rebuilt["run"]["verified"]
    assert without_run(rebuilt) == without_run(read_report(out))


def test_a_copied_in_file_is_not_taken_for_the_artifact(built, tmp_path):
    spec, out, _ = built
    copy_out = tmp_path / "out"
    shutil.copytree(out, copy_out)
    a, b = (copy_out / "v6-prepared-2.safetensors"), (copy_out / "v7-prepared-5.safetensors")
    shutil.copyfile(b, a)  # another artifact's bytes under this one's name
    proc = cli("release", spec, "--out", copy_out, "--json", "--only", "v6-prepared-2,v7-prepared-5")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["run"]["built"] == ["v6-prepared-2"]


def test_a_too_tight_tolerance_fails_the_release_naming_the_artifact_in_every_report(fixture_dir, tmp_path):
    spec = release_file(tmp_path, fixture_dir, tolerance={"v7-prepared-5": {"kl": 1e-12, "max_abs": 1e-9}})
    out = tmp_path / "out"
    proc = cli("release", spec, "--out", out, "--only", "v7-prepared-5", "--only", "v6-web-rwkv-1")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    report = read_report(out)
    failed = [e for e in report["artifacts"] if e["status"] == "failed"]
    assert [e["name"] for e in failed] == ["v7-prepared-5"]
    assert failed[0]["failure"].startswith(("max |Δlogit|", "KL")) and "set by the user" in \
        failed[0]["tolerance"]["reason"]
    assert report["summary"]["failed"] == 1 and report["summary"]["passed"] == 1
    xml_failures = ET.parse(out / "release-report.xml").getroot().findall(".//testcase[failure]")
    assert [c.get("name") for c in xml_failures] == ["v7-prepared-5"]
    assert failed[0]["failure"] in xml_failures[0].find("failure").get("message")
    md_row = next(line for line in (out / "release-report.md").read_text().splitlines() if "v7-prepared-5" in line)
    assert "FAIL" in md_row and "FAIL" in proc.stdout


def test_shards_build_the_matrix_once_and_merge_into_the_unsharded_report(built, tmp_path):
    spec, out, _ = built
    shard_out = tmp_path / "out"
    built_by = []
    for k in (1, 2):
        proc = cli("release", spec, "--out", shard_out, "--shard", f"{k}/2", "--quiet")
        assert proc.returncode == 0, proc.stderr
        built_by.append(read_report(shard_out, f"release-report-shard{k}of2")["run"]["built"])
    assert not set(built_by[0]) & set(built_by[1])
    assert sorted(built_by[0] + built_by[1]) == sorted(e["name"] for e in read_report(out)["artifacts"])
    merged_out = tmp_path / "merged"
    proc = cli("release", "--merge-reports", *(shard_out / f"release-report-shard{k}of2.json" for k in (2, 1)),
               "--out", merged_out)
    assert proc.returncode == 0, proc.stderr
    assert without_run(read_report(merged_out)) == without_run(read_report(out))
    assert len(ET.parse(merged_out / "release-report.xml").getroot().findall(".//testcase")) == len(built_by[0]) + \
        len(built_by[1])
    assert_one_line_error(cli("release", "--merge-reports", shard_out / "release-report-shard1of2.json", "--out",
                              merged_out), "give every shard")


@pytest.mark.skipif(sys.platform == "win32", reason="process groups and SIGINT")
def test_sigint_during_a_two_job_release_leaves_no_partial_file_and_a_rerun_finishes_it(built, tmp_path):
    spec, out, _ = built
    interrupted = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "rwkv_convert.cli", "release", str(spec), "--out", str(interrupted),
                             "--jobs", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 240
    seen = []
    while time.monotonic() < deadline:  # Ctrl-C once one artifact is done and the others are under way
        line = proc.stderr.readline()
        seen.append(line)
        if ": passed" in line or not line:
            break
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, "".join(seen) + err
    assert "Traceback" not in err and "run the same command again" in err
    assert not list(interrupted.rglob("*.rwkv-tmp*")) and not (interrupted / "release-report.json").exists()
    done = {p.stem for p in (interrupted / ".rwkv-release").glob("*.json")}
    assert 0 < len(done) < len(read_report(out)["artifacts"]), done
    rerun = cli("release", spec, "--out", interrupted, "--jobs", "2")
    assert rerun.returncode == 0, rerun.stderr
    report = read_report(interrupted)
    assert set(report["run"]["built"]).isdisjoint(done - set(report["run"]["built"]))
    assert without_run(report) == without_run(read_report(out))


@pytest.mark.parametrize("body, pattern", [
    ('[sources]\nv = "missing.pth"\n[[artifact]]\nto = "onnx"\n', "missing.pth: no such file"),
    ('[sources]\nv = "bundled:v7"\n[[artifact]]\nto = "gguf"\nquant = "q9"\n', "unknown --quant 'q9'"),
    ('[sources]\nv = "bundled:v7"\n[[artifact]]\nto = "onnx"\nspeed = 3\n', "'speed' is not a key"),
    ('[sources]\nv = "bundled:v7"\n[[artifact]]\nto = "pip"\n', "cannot convert v to pip"),
    ('[sources]\nv = "bundled:v7"\n', "no \\[\\[artifact\\]\\] entries"),
    ('[sources\n', "not valid TOML"),
    ('[sources]\nv = "bundled:v7"\n[[artifact]]\nto = "onnx"\ntolerance = {kl = 0}\n', "kl above 0"),
    ('[release]\nquality_bytes = "all"\n[sources]\nv = "bundled:v7"\n[[artifact]]\nto = "onnx"\n',
     "quality_bytes an integer"),
    ('[sources]\nv = "bundled:v7"\n[[artifact]]\nto = "onnx"\n[[artifact]]\nto = "onnx"\n', "two artifacts"),
])
def test_a_bad_release_file_is_one_line_and_builds_nothing(tmp_path, body, pattern):
    spec = tmp_path / "r.toml"
    spec.write_text(body)
    assert_one_line_error(cli("release", spec, "--out", tmp_path / "out"), pattern)
    assert not (tmp_path / "out").exists()


def test_only_and_shard_are_checked(tmp_path):
    spec = release.bundled_release()
    assert_one_line_error(cli("release", spec, "--out", tmp_path, "--only", "nope"), "no artifact named nope")
    assert_one_line_error(cli("release", spec, "--out", tmp_path, "--shard", "3/2"), "--shard takes K/N")


def test_the_bundled_release_with_quality_figures(tmp_path):
    """The README's main job, one artifact of it, with the quality figures the release file can ask for."""
    text = release.bundled_release().read_text().replace("seed = 0", "seed = 0\nquality = true\nquality_bytes = 2000")
    spec = tmp_path / "bundled.toml"
    spec.write_text(text)
    out = tmp_path / "out"
    proc = cli("release", spec, "--out", out, "--only", "onnx-int8", "--json")
    assert proc.returncode == 0, proc.stderr
    (entry,) = json.loads(proc.stdout)["artifacts"]
    q = entry["quality"]
    assert q["text"] == "heldout.txt" and q["runtime"] == "onnxruntime"
    assert 0 < q["kl"] < 0.05 and abs(q["delta_bits_per_byte"]) < 0.05 and q["top1"] > 0.9
    assert "bits/byte" in (out / "release-report.md").read_text()


@pytest.mark.skipif(not HAVE_LLAMA, reason="the bundled release has GGUF artifacts: needs llama-cpp-python")
def test_the_readme_main_job_releases_the_bundled_model(tmp_path):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    main_job = next(line.strip() for line in readme.splitlines() if line.startswith("    pip install"))
    assert main_job.endswith("&& rwkv-convert release"), main_job
    proc = subprocess.run([sys.executable, "-m", "rwkv_convert.cli", "release", "--jobs", "2", "--max-memory", "1"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = read_report(tmp_path / "release")  # the default --out
    formats = {e["format"] for e in report["artifacts"]}
    assert {"gguf", "onnx", "hf", "web-rwkv", "prepared"} <= formats
    assert report["summary"]["passed"] == len(report["artifacts"]) >= 8
    assert "8/8 verified" in proc.stdout or f"{len(report['artifacts'])}/{len(report['artifacts'])}" in proc.stdout


@pytest.mark.skipif(sys.platform != "linux", reason="pgrep and SIGKILL of the workers")
def test_a_worker_killed_outright_is_one_line_and_a_rerun_cleans_up_and_finishes(built, tmp_path):
    """The OOM killer's SIGKILL leaves a worker no chance to remove its temps: the release stops with one line
    (exit 2), and the next run removes the dead process's temps and finishes."""
    spec, out, _ = built
    target = tmp_path / "out"
    only = ["--only", "v6-web-rwkv-1,v6-onnx-3,v7-hf-4"]
    proc = subprocess.Popen([sys.executable, "-m", "rwkv_convert.cli", "release", str(spec), "--out", str(target),
                             "--jobs", "2", *only], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    while ": building" not in proc.stderr.readline():
        assert proc.poll() is None
    workers = subprocess.run(["pgrep", "-P", str(proc.pid), "-f", "spawn_main"], capture_output=True,
                             text=True).stdout.split()
    assert workers
    for pid in workers:
        os.kill(int(pid), signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "worker process died" in lines[0] and "Traceback" not in err
    rerun = cli("release", spec, "--out", target, "--jobs", "2", "--quiet", *only)
    assert rerun.returncode == 0, rerun.stderr
    assert not list(target.rglob("*.rwkv-tmp*"))
    whole = {e["name"]: e for e in read_report(out)["artifacts"]}
    assert read_report(target)["artifacts"] == [whole[n] for n in only[1].split(",")]
