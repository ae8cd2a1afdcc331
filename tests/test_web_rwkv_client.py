"""web-rwkv itself runs our `.st` exports (web-rwkv-py on any Vulkan device; in CI Mesa's lavapipe): `verify` of a
web-rwkv file runs it there, per version, a panic is a failed verification, a version or machine the client
cannot run is said in the verdict, and a model web-rwkv cannot hold is refused at convert time."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import rwkv_convert
from rwkv_convert.fixtures import fixture_path
from rwkv_convert.runtimes import web_rwkv
from rwkv_convert.verify import format_report, verify

from .test_cli import assert_one_line_error, cli
from .test_state_files import tuned  # noqa: F401  (the fixture)

REQUIRED = os.environ.get("RWKV_CONVERT_REQUIRE_WEB_RWKV") == "1"  # CI: a missing client fails, not skips
needs_client = pytest.mark.skipif(importlib.util.find_spec("web_rwkv_py") is None and not REQUIRED,
                                  reason=f"web-rwkv is not installed: {web_rwkv.CLIENT.install}")
TOKENS = 12


@needs_client
@pytest.mark.parametrize("variant, shape", [("v4", {}), ("v5.1", {}), ("v5.2", {}), ("v6", {}),
                                            ("v6", {"n_embd": 256, "head_size": 32, "n_layer": 5, "vocab": 300})])
def test_web_rwkv_runs_our_export_of_each_version_within_its_bound(fixture_dir, tmp_path, variant, shape):
    src = fixture_path(variant, directory=fixture_dir, **shape)
    out = rwkv_convert.convert(src, "web-rwkv", tmp_path / "m.st")[0]
    report = verify(out, src, tokens=TOKENS)
    assert report.passed, format_report(report)
    assert report.runner.startswith("web-rwkv (web-rwkv-py)") and not report.note
    assert report.scheme == "fp16" and set(report.rows) == {f"{s}/{m}" for s in ("fixed", "random")
                                                            for m in ("sequence", "one-token", "chunked")}


@needs_client
def edited_metadata(path) -> dict:
    """A file's metadata less our checksums (an edited copy has none: its edits are what is under test)."""
    with open(path, "rb") as f:
        meta = json.loads(f.read(int.from_bytes(f.read(8), "little")))["__metadata__"]
    return {k: v for k, v in meta.items() if k not in ("rwkv_convert.crc32", "rwkv_convert.metadata_crc32")}


def test_a_file_web_rwkv_misreads_is_a_failed_verification_with_its_message(fixture_dir, tmp_path):
    """The 5.1 export as it was written before: the log-form bonus [H], which web-rwkv's V5 panics on."""
    src = fixture_path("v5.1", directory=fixture_dir)
    good = rwkv_convert.convert(src, "web-rwkv", tmp_path / "good.st")[0]
    tensors = load_file(good)
    for name in [n for n in tensors if n.endswith("att.time_first")]:
        tensors[name] = tensors[name][:, 0].log().contiguous()
    save_file(tensors, tmp_path / "old.st", metadata=edited_metadata(good) | {"rwkv_convert.bonus": "log"})
    proc = cli("verify", tmp_path / "old.st", "--reference", src, "--tokens", TOKENS)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("FAIL") and "web-rwkv failed:" in last, proc.stdout


def test_rwkv_5_0_is_refused_at_convert_time(fixture_dir, tmp_path):
    proc = cli("convert", fixture_path("v5.0", directory=fixture_dir), "--to", "web-rwkv", "-o", tmp_path / "m.st")
    assert_one_line_error(proc, "web-rwkv has no RWKV-5.0: its attention has no gate")
    assert not (tmp_path / "m.st").exists()


def test_a_version_the_client_cannot_run_is_said_in_the_verdict(fixture_dir, tmp_path):
    src = fixture_path("v7", directory=fixture_dir)
    out = rwkv_convert.convert(src, "web-rwkv", tmp_path / "m.st")[0]
    report = verify(out, src, tokens=8)
    assert report.passed and "checked with our reader only" in report.note and "not RWKV-7" in report.note
    last = format_report(report).splitlines()[-1]
    assert last.startswith("PASS (checked with our reader only: web-rwkv-py==0.2.3 runs RWKV-4"), last


@pytest.mark.parametrize("shape, limit", [({"n_layer": 2}, "panics on fewer than 4 layers"),
                                          ({"n_embd": 192}, "n_embd in multiples of 128"),
                                          ({"vocab": 302}, "vocabularies of a multiple of 4")])
def test_shapes_the_client_miscomputes_are_checked_by_our_reader_and_said(fixture_dir, tmp_path, shape, limit):
    src = fixture_path("v6", directory=fixture_dir, **shape)
    out = rwkv_convert.convert(src, "web-rwkv", tmp_path / "m.st")[0]  # later web-rwkv runs them: written
    report = verify(out, src, tokens=8)
    assert report.passed and limit in report.note and "checked with our reader only" in report.note


def test_a_missing_client_is_said_in_the_verdict_with_its_install_line(fixture_dir, tmp_path, monkeypatch):
    # the one fault we cannot cause here without uninstalling it: the client reported missing
    monkeypatch.setattr(type(web_rwkv.CLIENT), "version", lambda self: None)
    src = fixture_path("v6", directory=fixture_dir)
    out = rwkv_convert.convert(src, "web-rwkv", tmp_path / "m.st")[0]
    report = verify(out, src, tokens=8)
    assert report.passed and report.runner.startswith("rwkv-convert runner")
    assert "web-rwkv-py is not installed: pip install web-rwkv-py==0.2.3" in format_report(report).splitlines()[-1]


@needs_client
def test_no_vulkan_device_is_said_in_the_verdict_not_a_failure(fixture_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("VK_ICD_FILENAMES", str(tmp_path / "no-driver.json"))  # Vulkan finds no driver
    src = fixture_path("v4", directory=fixture_dir)
    out = rwkv_convert.convert(src, "web-rwkv", tmp_path / "m.st")[0]
    report = verify(out, src, tokens=8)
    assert report.passed and "web-rwkv found no Vulkan device" in report.note and "lavapipe" in report.note


@needs_client
def test_noise_in_web_rwkv_fails(fixture_dir, tmp_path):
    """A bound that cannot fail is no bound: the same file with its matrices replaced by noise, run in web-rwkv."""
    src = fixture_path("v6", directory=fixture_dir)
    good = rwkv_convert.convert(src, "web-rwkv", tmp_path / "good.st")[0]
    tensors = load_file(good)
    generator = torch.Generator().manual_seed(3)
    for name, t in tensors.items():
        if t.dim() == 2 and "weight" in name and "ln" not in name:
            tensors[name] = (torch.randn(t.shape, generator=generator) * t.float().std()).half()
    save_file(tensors, tmp_path / "noise.st", metadata=edited_metadata(good))
    report = verify(tmp_path / "noise.st", src, tokens=TOKENS)
    assert not report.passed and report.runner.startswith("web-rwkv"), format_report(report)


def test_a_state_goes_into_its_own_file_beside_the_model_never_into_it(tuned, tmp_path):  # noqa: F811
    """web-rwkv ignores a time_state inside the model file: a state-tuned model's state is written as the state
    file web-rwkv and ai00 load, beside the model, and the model names it."""
    from rwkv_convert.state_file import read_state

    base, state, merged = tuned["v6"]
    written = rwkv_convert.convert(merged, "web-rwkv", tmp_path / "m.st")
    assert written == [tmp_path / "m.st", tmp_path / "m-state.st"]
    assert not any("time_state" in name for name in load_file(tmp_path / "m.st"))
    stored, given = read_state(tmp_path / "m-state.st"), read_state(state)
    assert all(torch.allclose(a, b, atol=1e-2, rtol=1e-3) for a, b in zip(stored.layers, given.layers, strict=True))
    report = verify(tmp_path / "m.st", merged, tokens=8)
    assert report.passed, format_report(report)
    if importlib.util.find_spec("web_rwkv_py") is not None or REQUIRED:
        assert "has no way to load a state file" in report.note
    # --state at convert time: the same two files
    assert rwkv_convert.convert(base, "web-rwkv", tmp_path / "s.st", state=state)[1] == tmp_path / "s-state.st"
    assert verify(tmp_path / "s.st", base, tokens=8, state=state).passed
    proc = cli("inspect", tmp_path / "m.st", "--json")
    assert str(tmp_path / "m-state.st") in proc.stdout, proc.stdout + proc.stderr
    (tmp_path / "m-state.st").unlink()
    assert_one_line_error(cli("inspect", tmp_path / "m.st"), "state is in m-state.st, which is not beside it")


@needs_client
def test_web_rwkv_gets_the_checked_file_under_our_name_not_the_users_path(fixture_dir, tmp_path, monkeypatch):
    src = fixture_path("v6", directory=fixture_dir)
    user = tmp_path / "the user's; model.st"
    rwkv_convert.convert(src, "web-rwkv", user)
    jobs = []
    save = web_rwkv.torch.save
    monkeypatch.setattr(web_rwkv.torch, "save", lambda obj, f: (jobs.append(obj), save(obj, f))[1])
    assert verify(user, src, tokens=8).passed
    handed = jobs[0]["path"]
    assert handed.endswith("/model.st") and str(tmp_path) not in handed  # our name, in a folder of ours
