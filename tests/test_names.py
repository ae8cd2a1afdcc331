"""One word per thing, and the older words still work: `--to hf|web-rwkv|prepared` (before: `--to safetensors
--layout NAME`), `--runner client` (before: native), RWKV_CONVERT_NO_KERNELS (before: RWKV_CONVERT_NO_NATIVE);
and every runtime behind one Session protocol (runtimes.base)."""

from __future__ import annotations

import pytest
import torch

import rwkv_convert
from rwkv_convert import doctor
from rwkv_convert.errors import RwkvConvertError
from rwkv_convert.formats import registry
from rwkv_convert.runtimes.base import runner_named, verify_modes
from rwkv_convert.runtimes.ours import ForwardSession, run_ours
from rwkv_convert.verify import format_report, verify

from .test_cli import assert_one_line_error, cli

BUNDLED = "bundled:v7"


@pytest.mark.parametrize("name", ["hf", "web-rwkv", "prepared"])
def test_each_safetensors_format_is_a_target_of_its_own_and_the_older_spelling_names_the_same(name):
    assert name in registry.targets() and "safetensors" in registry.targets()
    assert registry.writer_for(name) is registry.writer_for("safetensors", name) is registry.by_name(name)
    assert registry.writer_for(name, name) is registry.by_name(name)  # --to hf --layout hf says it twice
    other = next(n for n in ("hf", "web-rwkv", "prepared") if n != name)
    with pytest.raises(RwkvConvertError, match="--layout is for --to safetensors"):
        registry.writer_for(name, other)
    with pytest.raises(RwkvConvertError, match="needs --layout .*or give the layout as --to"):
        registry.writer_for("safetensors")


def test_both_spellings_write_the_same_bytes(tmp_path):
    new = rwkv_convert.convert(BUNDLED, "web-rwkv", tmp_path / "new.st")[0]
    old = rwkv_convert.convert(BUNDLED, "safetensors", tmp_path / "old.st", layout="web-rwkv")[0]
    assert new.read_bytes() == old.read_bytes()
    proc = cli("convert", BUNDLED, "--to", "prepared", "--strategy", "cpu bf16", "-o", tmp_path / "p.safetensors")
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stderr and (tmp_path / "p.safetensors").is_file()
    assert registry.detect(tmp_path / "p.safetensors")[0].name == "prepared"


def test_a_suffix_names_the_format_and_an_unknown_one_lists_them(tmp_path):
    assert registry.target_for_output("m.st") == ("web-rwkv", None)
    assert registry.target_for_output("m.safetensors", "hf") == ("safetensors", "hf")
    proc = cli("convert", BUNDLED, "-o", tmp_path / "m.bin")
    assert_one_line_error(proc, r"give --to \(.*web-rwkv.*\); the names that say it: .*\.st \(web-rwkv\)")
    assert not (tmp_path / "m.bin").exists()


def test_runner_words():
    assert runner_named("client") == runner_named("native") == "client" and runner_named("ours") == "ours"
    with pytest.raises(RwkvConvertError, match="unknown runner 'llama'; use client .* or ours"):
        runner_named("llama")


def test_verify_in_the_client_under_either_word(tmp_path):
    onnx = rwkv_convert.convert(BUNDLED, "onnx", tmp_path / "m.onnx")[0]
    client = verify(onnx, BUNDLED, tokens=8, runner="client")
    native = verify(onnx, BUNDLED, tokens=8, runner="native")
    assert client.passed and "onnxruntime" in client.runner and client.to_dict() == native.to_dict()
    proc = cli("verify", onnx, "--reference", BUNDLED, "--tokens", "8", "--runner", "nope")
    assert proc.returncode == 2 and "client" in proc.stderr


@pytest.mark.parametrize("variable", ["RWKV_CONVERT_NO_KERNELS", "RWKV_CONVERT_NO_NATIVE"])
def test_either_variable_turns_the_kernels_off_and_doctor_names_the_one_set(monkeypatch, variable):
    monkeypatch.setenv(variable, "1")
    kernels = next(c for c in doctor.run_checks() if c.name == "CPU kernels")
    assert kernels.status == "missing" and kernels.fix == f"unset {variable}"


def test_our_runner_is_a_session_with_verify_modes():
    model = rwkv_convert.load(BUNDLED)
    tokens = [5, 9, 100, 3, 250, 7, 7, 1]
    modes, with_states = verify_modes(ForwardSession(model), tokens, 3), run_ours(model, tokens, 3)
    for mode in ("seq", "one", "split"):
        assert torch.equal(modes[mode], with_states[mode]) and modes[mode].shape == (8, 257)
        assert len(with_states[mode + "_state"]) == len(model.init_state())
    # the three ways agree: the state is carried
    assert (modes["one"] - modes["seq"]).abs().max() < 1e-4 and (modes["split"] - modes["seq"]).abs().max() < 1e-4


def test_two_reports_on_one_file_name_the_options_that_collide(tmp_path):
    report = tmp_path / "r.json"
    proc = cli("quality", BUNDLED, "--json-out", report, "--plot", report)
    assert proc.returncode == 2 and "--json-out and --plot name the same file" in proc.stderr
    assert not report.exists()


@pytest.mark.parametrize("to, client", [("gguf", "llama_cpp"), ("hf", "hf_transformers")])
def test_a_missing_client_is_said_in_the_verdict_of_every_format(tmp_path, monkeypatch, to, client):
    """Our reader checks the file where its client is not installed, and the verdict line says so and how to
    install it: never a bare PASS."""
    import importlib

    runtime = importlib.import_module(f"rwkv_convert.runtimes.{client}")
    out = rwkv_convert.convert(BUNDLED, to, tmp_path / ("m.gguf" if to == "gguf" else "m"))[0]
    out = out if to == "gguf" else tmp_path / "m"
    monkeypatch.setattr(type(runtime.CLIENT), "version", lambda self: None)  # the fault: the client missing
    report = verify(out, BUNDLED, tokens=8)
    assert report.passed and f"{runtime.CLIENT.distribution} is not installed: pip install" in report.note
    assert format_report(report).splitlines()[-1].startswith("PASS (checked with our reader only:")
