"""Hostile inputs and careless paths, each attack built here: no input runs code (through our readers or a
client's), no command writes over or deletes what the user has, and no declared size makes us allocate what
the file does not hold. Every refusal is one line and exit code 2, writes nothing and leaves the inputs
byte-identical (docs/security.md)."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import rwkv_convert
from rwkv_convert.cli import main
from rwkv_convert.fixtures import make_state_dict

from .conftest import save_atomic

MEMORY_LIMIT = 2 << 30  # a refused bomb never gets near it; RLIMIT_DATA counts what a process allocates


def run_limited(*args, env_extra=None, timeout=120):
    """The CLI in a subprocess with its allocations capped at MEMORY_LIMIT (a bomb that got through would fail
    to allocate or be killed, not pass)."""
    env = dict(os.environ, **(env_extra or {}))

    def cap():
        resource.setrlimit(resource.RLIMIT_DATA, (MEMORY_LIMIT, MEMORY_LIMIT))

    return subprocess.run([sys.executable, "-m", "rwkv_convert.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout, preexec_fn=cap)


def one_line_exit_2(proc, pattern: str | None = None) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    if pattern:
        assert pattern in lines[0], lines[0]
    return lines[0]


def invoke(*args):
    """The CLI in this process (fast, for refusals that come before any work)."""
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def refused_in_process(result, pattern: str | None = None) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output)
    errors = [line for line in result.output.splitlines() if line.lower().startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    if pattern:
        assert pattern in errors[0], errors[0]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under folder (links as their targets' names) with its bytes' hash."""
    found = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        if p.is_symlink():
            found[rel] = "-> " + os.readlink(p)
        elif p.is_file():
            found[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            found[rel] = "dir"
    return found


class Marker:
    """Unpickling this runs code: it creates `path` (the proof that code ran)."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def hostile_pickle(path: Path, marker: Path) -> Path:
    torch.save({"emb.weight": torch.zeros(2, 2), "payload": Marker(marker)}, path)
    return path


@pytest.fixture(scope="module")
def v6(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("v6")
    return save_atomic(make_state_dict("v6", n_layer=1, n_embd=64, vocab=300), folder / "v6.pth")


@pytest.fixture(scope="module")
def v7(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("v7")
    return save_atomic(make_state_dict("v7", n_layer=1, n_embd=64, vocab=300), folder / "v7.pth")


@pytest.fixture(scope="module")
def pip_files(v6, tmp_path_factory) -> dict[str, Path]:
    """A good pip-package conversion of v6 and one of a model of noise with the same shapes."""
    folder = tmp_path_factory.mktemp("pip")
    good = rwkv_convert.convert(v6, "pip", folder / "good.pth", strategy="cpu fp32")[0]
    noise = {k: torch.randn_like(v) for k, v in torch.load(v6, weights_only=True).items()}
    noisy = save_atomic(noise, folder / "noise-src.pth")
    bad = rwkv_convert.convert(noisy, "pip", folder / "noise.pth", strategy="cpu fp32")[0]
    return {"good": good, "noise": bad}


# ---- 1. the pip package sees only the file we checked --------------------------------------------------------

@pytest.mark.parametrize("name", ["cand.bin", "cand", "cand.pth "])
@pytest.mark.parametrize("no_weights_only", [True, False], ids=["force-no-weights-only", "plain-env"])
def test_a_hostile_sibling_is_never_what_the_pip_package_loads(name, no_weights_only, pip_files, v6, tmp_path):
    """The package appends .pth and strips spaces: `verify cand.bin` once loaded cand.bin.pth, and with
    TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 ran its pickle."""
    candidate = tmp_path / name
    shutil.copyfile(pip_files["good"], candidate)
    sibling = tmp_path / (name.strip() if name.endswith(" ") else name + ".pth")
    marker = tmp_path / "code-ran"
    hostile_pickle(sibling, marker)
    before = snapshot(tmp_path)
    env = {"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"} if no_weights_only else {}
    proc = run_limited("verify", candidate, "--reference", v6, "--tokens", "4", env_extra=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "PASS" in proc.stdout
    assert not marker.exists()
    assert snapshot(tmp_path) == before


def test_the_verdict_is_about_the_named_file_not_a_sibling(pip_files, v6, tmp_path):
    """A broken candidate beside a good `.pth` of the same name once verified as PASS."""
    shutil.copyfile(pip_files["noise"], tmp_path / "cand.bin")
    shutil.copyfile(pip_files["good"], tmp_path / "cand.bin.pth")
    proc = run_limited("verify", tmp_path / "cand.bin", "--reference", v6, "--tokens", "4")
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "FAIL" in proc.stdout


def test_the_pip_package_runs_weights_only_even_when_told_otherwise(pip_files, tmp_path):
    """Its process gets TORCH_FORCE_WEIGHTS_ONLY_LOAD=1 and never the variable that undoes it."""
    from rwkv_convert.client_files import client_environment

    env = client_environment({"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1", "PATH": "/bin"})
    assert env == {"PATH": "/bin", "TORCH_FORCE_WEIGHTS_ONLY_LOAD": "1"}


def test_a_hostile_candidate_is_refused_before_any_client(v6, tmp_path):
    marker = tmp_path / "code-ran"
    candidate = hostile_pickle(tmp_path / "cand.pth", marker)
    proc = run_limited("verify", candidate, "--reference", v6, env_extra={"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"})
    one_line_exit_2(proc, "refusing to load")
    assert not marker.exists()


# ---- 2. an HF directory's code runs only if it is ours ------------------------------------------------------

@pytest.fixture(scope="module")
def hf_dir(v7, tmp_path_factory) -> Path:
    return rwkv_convert.convert(v7, "safetensors", tmp_path_factory.mktemp("hf") / "hf", layout="hf")[0].parent


def tampered(hf_dir: Path, tmp_path: Path, change) -> Path:
    copy = tmp_path / "model"
    shutil.copytree(hf_dir, copy)
    change(copy)
    return copy


def append_code(file: str, marker: Path):
    def change(directory: Path) -> None:
        with open(directory / file, "a") as f:
            f.write(f"\nimport os\nos.mkdir({str(marker)!r})\n")
    return change


def test_the_shipped_hf_directory_verifies(hf_dir, v7):
    proc = run_limited("verify", hf_dir, "--reference", v7, "--tokens", "4")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "transformers (RWKV7ForCausalLM)" in proc.stdout and "--trust-remote-code" not in proc.stdout


@pytest.mark.parametrize("how", ["edited", "added", "auto_map", "tokenizer"])
def test_code_that_is_not_ours_never_runs(how, hf_dir, v7, tmp_path):
    marker = tmp_path / "code-ran"
    if how == "edited":
        change, pattern = append_code("modeling_rwkv7.py", marker), "modeling_rwkv7.py differs from the copy"
    elif how == "tokenizer":
        change, pattern = append_code("tokenization_rwkv7.py", marker), "tokenization_rwkv7.py differs"
    elif how == "added":
        def change(d):
            (d / "evil_rwkv7.py").write_text(f"import os\nos.mkdir({str(marker)!r})\n")
            config = json.loads((d / "config.json").read_text())
            config["auto_map"]["AutoModelForCausalLM"] = "evil_rwkv7.RWKV7ForCausalLM"
            (d / "config.json").write_text(json.dumps(config))
        pattern = "evil_rwkv7.py is not a file rwkv-convert ships"
    else:
        def change(d):
            config = json.loads((d / "config.json").read_text())
            config["auto_map"]["AutoModelForCausalLM"] = "modeling_rwkv7.Other"
            (d / "config.json").write_text(json.dumps(config))
        pattern = "maps the model to other code"
    directory = tampered(hf_dir, tmp_path, change)
    before = snapshot(tmp_path)
    one_line_exit_2(run_limited("verify", directory, "--reference", v7, "--tokens", "4"), pattern)
    assert not marker.exists()
    assert snapshot(tmp_path) == before


def test_trust_remote_code_runs_it_and_says_so(hf_dir, v7, tmp_path):
    marker = tmp_path / "code-ran"
    directory = tampered(hf_dir, tmp_path, append_code("modeling_rwkv7.py", marker))
    proc = run_limited("verify", directory, "--reference", v7, "--tokens", "4", "--trust-remote-code")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert marker.is_dir()  # the opt-in is real: the directory's own code ran
    assert "the directory's own code run by --trust-remote-code" in proc.stdout


def test_a_pickled_bin_beside_the_weights_is_never_loaded(hf_dir, v7, tmp_path):
    marker = tmp_path / "code-ran"
    directory = tampered(hf_dir, tmp_path, lambda d: hostile_pickle(d / "pytorch_model.bin", marker))
    proc = run_limited("verify", directory, "--reference", v7, "--tokens", "4",
                       env_extra={"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not marker.exists()


# ---- 3. release writes inside --out only and deletes only what it recorded -------------------------------------

def release_file(folder: Path, source: str, output: str | None, to: str = "gguf", extra: str = "") -> Path:
    out = f"output = {json.dumps(output)}\n" if output is not None else ""
    path = folder / "release.toml"
    path.write_text(f'[sources]\nv7 = "{source}"\n[[artifact]]\nname = "x"\nto = "{to}"\n{extra}{out}')
    return path


@pytest.mark.parametrize("output", [".", "./", "..", "../x.gguf", ".rwkv-release/x.json", ".rwkv-release", "/tmp/x",
                                   "a/../../x"])
def test_release_outputs_that_are_not_inside_out_are_refused(output, v7, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    shutil.copyfile(v7, work / "v7.pth")
    spec = release_file(work, "v7.pth", output)
    before = snapshot(tmp_path)
    for out in (".", "dist"):
        proc = subprocess.run([sys.executable, "-m", "rwkv_convert.cli", "release", str(spec), "--out", out],
                              capture_output=True, text=True, cwd=work, timeout=120)
        one_line_exit_2(proc, "output is a file name inside --out")
        assert snapshot(tmp_path) == before


@pytest.mark.parametrize("where", ["source", "release-file"])
def test_a_release_output_that_holds_an_input_is_refused(where, v7, tmp_path):
    (tmp_path / "sub").mkdir()
    shutil.copyfile(v7, tmp_path / ("sub/v7.pth" if where == "source" else "v7.pth"))
    spec_folder = tmp_path / "sub" if where == "release-file" else tmp_path
    spec = release_file(spec_folder, "sub/v7.pth" if where == "source" else "../v7.pth", "sub", to="safetensors",
                        extra='layout = "hf"\n')
    before = snapshot(tmp_path)
    proc = run_limited("release", spec, "--out", tmp_path)
    one_line_exit_2(proc, "it holds the input")
    assert snapshot(tmp_path) == before


def test_a_stale_directory_artifact_keeps_what_the_release_did_not_write(v7, tmp_path):
    """An HF artifact is rebuilt into an empty folder: only the files its key records are removed first."""
    shutil.copyfile(v7, tmp_path / "v7.pth")
    spec = release_file(tmp_path, "v7.pth", "hfdir", to="safetensors", extra='layout = "hf"\n')
    out = tmp_path / "dist"
    assert run_limited("release", spec, "--out", out, "--quiet").returncode == 0
    (out / "hfdir" / "notes.txt").write_text("mine")
    spec.write_text(spec.read_text().replace('layout = "hf"\n', 'layout = "hf"\ndtype = "fp16"\n'))  # a new key
    proc = run_limited("release", spec, "--out", out, "--quiet")
    assert proc.returncode == 1
    entry = json.loads((out / "release-report.json").read_text())["artifacts"][0]
    assert "which this release did not write" in entry["failure"]
    assert (out / "hfdir" / "notes.txt").read_text() == "mine" and (out / "hfdir" / "config.json").is_file()
    (out / "hfdir" / "notes.txt").unlink()
    assert run_limited("release", spec, "--out", out, "--quiet").returncode == 0
    assert json.loads((out / "hfdir" / "config.json").read_text())["dtype"] == "float16"


# ---- 4. reports never land on inputs ----------------------------------------------------------------------------

def json_out_cases(v6: Path, tmp_path: Path) -> list[tuple[list, Path]]:
    """(command line with {OUT}, the input it names) for every input of every command that reports."""
    text = tmp_path / "text.txt"
    text.write_text("def f():\n    return 1\n" * 20)
    state = tmp_path / "state.pth"
    torch.save({f"blocks.{i}.att.time_state": torch.zeros(1, 64, 64) for i in range(1)}, state)
    candidate = tmp_path / "cand.pth"
    shutil.copyfile(v6, candidate)
    release = release_file(tmp_path, str(v6), None)
    return [(["inspect", v6, "--json-out", "{OUT}"], v6),
            (["plan", v6, "--strategy", "cpu fp32", "--json-out", "{OUT}"], v6),
            (["verify", candidate, "--reference", v6, "--json-out", "{OUT}"], candidate),
            (["verify", candidate, "--reference", v6, "--json-out", "{OUT}"], v6),
            (["verify", candidate, "--reference", v6, "--state", state, "--json-out", "{OUT}"], state),
            (["quality", v6, "--json-out", "{OUT}"], v6),
            (["quality", v6, "--plot", "{OUT}"], v6),
            (["quality", v6, "--text", text, "--json-out", "{OUT}"], text),
            (["quality", v6, "--text", text, "--plot", "{OUT}"], text),
            (["doctor", v6, "--json-out", "{OUT}"], v6),
            (["release", release, "--out", tmp_path / "dist", "--json-out", "{OUT}"], release),
            (["release", release, "--out", tmp_path / "dist", "--json-out", "{OUT}"], v6)]


@pytest.mark.parametrize("alias", ["same", "symlink", "hardlink", "folder", "dotdot"])
def test_json_out_and_plot_never_overwrite_an_input(alias, v6, tmp_path):
    source = tmp_path / "in" / "v6.pth"
    source.parent.mkdir()
    shutil.copyfile(v6, source)
    for args, target in json_out_cases(source, tmp_path / "in"):
        if alias == "same":
            out = target
        elif alias == "symlink":
            out = tmp_path / "link"
            out.unlink(missing_ok=True)
            out.symlink_to(target)
        elif alias == "hardlink":
            out = tmp_path / "hard"
            out.unlink(missing_ok=True)
            os.link(target, out)
        elif alias == "folder":
            out = target.parent
        else:
            out = target.parent / ".." / target.parent.name / target.name
        before = snapshot(tmp_path)
        result = invoke(*[str(out) if a == "{OUT}" else a for a in args])
        refused_in_process(result, None if alias == "folder" else "refusing to write")
        assert snapshot(tmp_path) == before, args


def test_a_report_into_the_key_store_is_refused(v6, tmp_path):
    spec = release_file(tmp_path, str(v6), None)
    (tmp_path / "dist" / ".rwkv-release").mkdir(parents=True)
    refused_in_process(invoke("release", spec, "--out", tmp_path / "dist", "--json-out",
                              tmp_path / "dist" / ".rwkv-release" / "x.json"), "inside the input")


def test_an_output_that_is_the_working_directory_or_above_is_refused(v6, tmp_path, monkeypatch):
    (tmp_path / "deep").mkdir()
    monkeypatch.chdir(tmp_path / "deep")
    for out in (".", "..", str(tmp_path)):
        proc = invoke("convert", v6, "--to", "safetensors", "--layout", "hf", "-o", out)
        refused_in_process(proc, "current directory or a folder above it")


# ---- 5. declared sizes, sparse tensors, bad entries ---------------------------------------------------------------

def bomb(v6: Path, path: Path, how: str) -> Path:
    sd = torch.load(v6, weights_only=True)
    vocab, width = sd["emb.weight"].shape
    if how == "stride-0":  # 2 x 17 GB declared over two rows
        rows = 1 << 26
        sd["emb.weight"] = torch.randn(1, width).expand(rows, width)
        sd["head.weight"] = torch.randn(1, width).expand(rows, width)
    elif how == "aliased":  # strides that revisit the same bytes without being 0
        base = torch.randn(vocab + width)
        sd["emb.weight"] = base.as_strided((vocab, width), (1, 1))
    elif how == "shared-record":  # two tensors over one record
        base = torch.randn(vocab * width)
        sd["emb.weight"], sd["head.weight"] = base.view(vocab, width), base.view(vocab, width)
    elif how == "sparse":
        sd["ln_out.weight"] = sd["ln_out.weight"].to_sparse()
    torch.save(sd, path)
    return path


@pytest.mark.parametrize("how,pattern", [("stride-0", "share bytes"), ("aliased", "share bytes"),
                                         ("shared-record", "views of each other's bytes"),
                                         ("sparse", "sparse_coo tensor")])
@pytest.mark.parametrize("command", ["inspect", "run", "convert"])
def test_checkpoints_declaring_more_than_they_hold_are_refused(how, pattern, command, v6, tmp_path):
    path = bomb(v6, tmp_path / "bomb.pth", how)
    before = snapshot(tmp_path)
    args = {"inspect": [], "run": ["--tokens", "2"], "convert": ["--to", "gguf", "-o", tmp_path / "x.gguf"]}[command]
    one_line_exit_2(run_limited(command, path, *args, timeout=60), pattern)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("how", ["stride-0", "sparse", "huge-layer"])
def test_state_files_declaring_more_than_they_hold_are_refused(how, v6, tmp_path):
    shape = (1, 64, 64)
    if how == "stride-0":
        state = {"blocks.0.att.time_state": torch.zeros(1, 1, 1).expand(1 << 20, 4096, 64)}
    elif how == "sparse":
        state = {"blocks.0.att.time_state": torch.zeros(shape).to_sparse()}
    else:  # a layer index that a naive scan for gaps would count up to
        state = {"blocks.0.att.time_state": torch.zeros(shape), f"blocks.{10 ** 15}.att.time_state": torch.zeros(shape)}
    path = tmp_path / "state.pth"
    torch.save(state, path)
    one_line_exit_2(run_limited("run", v6, "--state", path, "--tokens", "2", timeout=60))


@pytest.fixture(scope="module")
def onnx_export(v6, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("onnx")
    rwkv_convert.convert(v6, "onnx", folder / "m.onnx", graphs="step", external_data=True)
    return folder / "m.onnx"


def altered_onnx(export: Path, folder: Path, change) -> Path:
    """A copy of the export with one external-data entry changed, without our checksum entry (as another tool
    would write it: nothing but the entries themselves to go by)."""
    import onnx

    folder.mkdir(parents=True)
    for f in export.parent.iterdir():
        if f.name.startswith(export.name) and f.name != export.name:
            shutil.copyfile(f, folder / f.name)
    model = onnx.load(str(export), load_external_data=False)
    for p in list(model.metadata_props):
        if p.key == "rwkv.checksums":
            model.metadata_props.remove(p)
    tensor = next(t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    entries = {e.key: e.value for e in tensor.external_data}
    change(entries, tensor)
    del tensor.external_data[:]
    for k, v in entries.items():
        entry = tensor.external_data.add()
        entry.key, entry.value = k, v
    onnx.save(model, str(folder / export.name))
    return folder / export.name


ONNX_ENTRIES = {
    "no-length": (lambda e, t: e.pop("length"), "must be whole numbers"),
    "float-offset": (lambda e, t: e.update(offset="1.5"), "must be whole numbers"),
    "negative-offset": (lambda e, t: e.update(offset="-8"), "must be whole numbers"),
    "absolute": (lambda e, t: e.update(location="/etc/passwd"), "lies beside it in its folder"),
    "dotdot": (lambda e, t: e.update(location="../../secret"), "lies beside it in its folder"),
    "link-out": (lambda e, t: e.update(location="escape"), "leads outside the model's folder"),
    "short-length": (lambda e, t: e.update(length=str(int(e["length"]) // 2)), "declares shape"),
    "huge": (lambda e, t: (t.dims.__setitem__(0, 1 << 28), e.update(length=str((1 << 28) * 4 * t.dims[1]))),
             "is shorter than its ONNX export needs"),
}


@pytest.mark.parametrize("case", list(ONNX_ENTRIES))
def test_onnx_external_data_entries_are_checked_before_any_file_is_opened(case, onnx_export, tmp_path):
    change, pattern = ONNX_ENTRIES[case]
    secret = tmp_path / "secret"
    secret.write_bytes(b"\0" * 1_000_000)
    model = altered_onnx(onnx_export, tmp_path / "a" / "b", change) if case == "dotdot" else None
    if model is None:
        model = altered_onnx(onnx_export, tmp_path / "m", change)
    if case == "link-out":
        (model.parent / "escape").symlink_to(secret)
    before = snapshot(tmp_path)
    one_line_exit_2(run_limited("run", model, "--tokens", "2", timeout=60), pattern)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("text,pattern", [
    ('sources = "v7.pth"\n', "sources is a str, not a table"),
    ('release = "x"\n[sources]\nv7 = "v7.pth"\n', "release is a str, not a table"),
    ('artifact = "x"\n[sources]\nv7 = "v7.pth"\n', "artifact is a str, not a table"),
    ('artifact = ["gguf"]\n[sources]\nv7 = "v7.pth"\n', "artifact 1 is a str, not a table"),
])
def test_release_files_of_the_wrong_shape_are_one_line(text, pattern, tmp_path):
    spec = tmp_path / "r.toml"
    spec.write_text(text)
    refused_in_process(invoke("release", spec, "--out", tmp_path / "dist"), pattern)


def test_token_counts_too_large_to_hold_are_refused_before_allocating(v6, tmp_path):
    one_line_exit_2(run_limited("verify", v6, "--reference", v6, "--tokens", str(10 ** 12), timeout=60),
                    "of memory and")
    spec = release_file(tmp_path, str(v6), None)
    spec.write_text("[release]\ntokens = 1000000000000\n" + spec.read_text())
    proc = run_limited("release", spec, "--out", tmp_path / "dist", "--quiet", timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    entry = json.loads((tmp_path / "dist" / "release-report.json").read_text())["artifacts"][0]
    assert "of memory and" in entry["failure"]


@pytest.mark.parametrize("claim", ["record", "record-and-shape"])
def test_a_storage_that_claims_more_than_its_record_is_refused(claim, v6, tmp_path):
    """The pickle names each storage's element count: inflated (and the tensor's first dimension with it), it
    would map the records after it, or past the file's end."""
    import pickletools
    import struct
    import zipfile

    from .test_fuzz_headers import central_entries, replace_member

    blob = bytearray(v6.read_bytes())
    with zipfile.ZipFile(v6) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith("data.pkl"))
        pickled = bytearray(archive.read(info))
    name_len, extra_len = struct.unpack_from("<HH", blob, info.header_offset + 26)
    start = info.header_offset + 30 + name_len + extra_len
    ops = list(pickletools.genops(bytes(pickled)))
    formats = {"BININT1": "<B", "BININT2": "<H", "BININT": "<i"}
    # the emb.weight storage: the last integer before the first persistent id, then its first size
    first = next(k for k, (op, _, _) in enumerate(ops) if op.name == "BINPERSID")
    count = next(ops[k] for k in range(first, 0, -1) if ops[k][0].name in formats)
    size = next(ops[k] for k in range(first + 2, len(ops)) if ops[k][0].name in formats)
    struct.pack_into(formats[count[0].name], pickled, count[2] + 1, count[1] * 4 if count[1] * 4 < 65536 else 65535)
    if claim == "record-and-shape":
        struct.pack_into(formats[size[0].name], pickled, size[2] + 1, min(size[1] * 4, 255 if size[0].name ==
                                                                           "BININT1" else 65535))
    replace_member(blob, info, start, bytes(pickled), central_entries(bytes(blob))[info.filename])
    path = tmp_path / "inflated.pth"
    path.write_bytes(blob)
    for command in (["inspect"], ["run", "--tokens", "2"]):
        one_line_exit_2(run_limited(command[0], path, *command[1:], timeout=60))
