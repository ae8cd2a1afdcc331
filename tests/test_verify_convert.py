"""`verify`, `convert` and `plan` through the real CLI: exit codes, reports, and no partial files."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from rwkv_convert.bounds import TOLERANCES
from rwkv_convert.fixtures import fixture_path
from rwkv_convert.verify import verify

from .conftest import save_atomic
from .test_cli import assert_one_line_error, cli


@pytest.mark.slow
def test_verify_passes_a_faithful_pip_file_and_writes_json(fixture_dir, tmp_path):
    src = fixture_path("v5.2", directory=fixture_dir)
    out = tmp_path / "v52-i8.pth"
    proc = cli("convert", src, "--to", "pip", "--strategy", "cpu fp32i8", "-o", out, "--verify", "--tokens", "24")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "rwkv pip package (cpu fp32i8)" in proc.stdout and "PASS" in proc.stdout
    proc = cli("verify", out, "--reference", src, "--tokens", "24", "--json-out", tmp_path / "report.json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["passed"] and report["scheme"] == "i8" and len(report["rows"]) == 6
    assert all(0 < row["max_abs"] < TOLERANCES["i8"].max_abs for row in report["rows"].values())


def test_verify_fails_a_candidate_with_one_corrupted_tensor(fixture_dir, tmp_path):
    src = fixture_path("v6", directory=fixture_dir)
    sd = torch.load(src, weights_only=True)
    sd["blocks.4.ffn.value.weight"] = sd["blocks.4.ffn.value.weight"] * 1.5
    bad = save_atomic(sd, tmp_path / "corrupt.pth")
    proc = cli("verify", bad, "--reference", src, "--tokens", "16")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("FAIL") and "worst:" in last and "max |Δlogit|" in proc.stdout


def test_verify_reports_v7_int8_error(fixture_dir):
    src = fixture_path("v7", directory=fixture_dir)
    report = verify(src, src, "cpu fp32i8", tokens=16)
    assert report.passed and report.scheme == "i8"
    worst = max(m.max_abs for m in report.rows.values())
    assert 1e-3 < worst < TOLERANCES["i8"].max_abs


@pytest.mark.slow
def test_verify_bad_input_exits_2(fixture_dir, tmp_path):
    src = fixture_path("v6", directory=fixture_dir)
    assert_one_line_error(cli("verify", src, "--reference", src, "--strategy", "cpu fp61"), "not a dtype")
    assert_one_line_error(cli("verify", src, "--reference", src, "--strategy", "cuda fp16"), "no CUDA device")
    assert_one_line_error(cli("verify", tmp_path / "nope.pth", "--reference", src), "no such file")
    other = fixture_path("v6", n_layer=2, directory=fixture_dir, n_embd=192, vocab=1000)
    assert_one_line_error(cli("verify", other, "--reference", src), "is not a conversion of")


@pytest.mark.slow
def test_converted_file_for_another_strategy_is_refused(fixture_dir, tmp_path):
    src = fixture_path("v4", directory=fixture_dir)
    out = tmp_path / "v4.pth"
    assert cli("convert", src, "--to", "pip", "--strategy", "cpu bf16", "-o", out).returncode == 0
    assert_one_line_error(cli("verify", out, "--reference", src, "--strategy", "cpu fp32"),
                          'converted for "cpu bf16"')


@pytest.mark.parametrize("strategy,pattern", [
    ("cpu fp16i3", "i3 weights do not exist"),
    ("cuda fp16 *2+ -> cpu fp32", "has no \\*N, but segment 1"),
    ("cpu fp32 -> ", "segment 2 is empty"),
])
@pytest.mark.slow
def test_convert_bad_strategy_exits_2_and_writes_nothing(strategy, pattern, fixture_dir, tmp_path):
    proc = cli("convert", fixture_path("v6", directory=fixture_dir), "--to", "pip", "--strategy", strategy,
               "-o", tmp_path / "out.pth")
    assert_one_line_error(proc, pattern)
    assert list(tmp_path.iterdir()) == []


def _mount_tmpfs(path: Path, options: str) -> bool:
    path.mkdir(exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.mark.parametrize("options,pattern", [("size=256k", "No space left on device|cannot write"),
                                             ("ro", "Read-only file system|cannot write")])
def test_convert_into_a_full_or_read_only_directory(options, pattern, fixture_dir, tmp_path):
    target = tmp_path / "mnt"
    if not _mount_tmpfs(target, options):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        proc = cli("convert", fixture_path("v6", directory=fixture_dir), "--to", "pip", "-o", target / "out.pth")
        assert_one_line_error(proc, pattern)
        assert list(target.iterdir()) == []
    finally:
        subprocess.run(["umount", str(target)], check=False)


@pytest.mark.slow
def test_plan_table_and_json(fixture_dir):
    src = fixture_path("v6", directory=fixture_dir)
    proc = cli("plan", "--strategy", "cpu fp32i8 *3 -> cpu bf16 *10 -> cpu fp16", src, "--json")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert [s["weights"] for s in plan["slots"]] == ["i8"] * 3 + ["bf16"] * 5
    assert plan["rescale_layer"] == 6
    assert any("cpu fp16" in n and "no layers" in n for n in plan["notes"])
    table = cli("plan", "--strategy", "cpu fp32i8", src).stdout
    assert "slot" in table and "head" in table and "cpu:" in table


@pytest.mark.slow
def test_verify_runs_hf_exports_in_transformers_where_they_have_a_python_client(fixture_dir, tmp_path,
                                                                                neox_tokenizer):
    """RWKV-4 in transformers' RwkvForCausalLM, RWKV-7 in the rwkv7-hf code shipped in the directory, both as
    AutoModelForCausalLM loads them; v6 directories (for llama.cpp's converter) in our reader. An altered weight
    fails in transformers too."""
    pytest.importorskip("transformers")
    import rwkv_convert

    runners = {}
    for variant, options in (("v4", {"tokenizer": neox_tokenizer}), ("v7", {}), ("v6", {})):
        src = fixture_path(variant, directory=fixture_dir)
        out = tmp_path / f"hf-{variant}"
        rwkv_convert.convert(src, "safetensors", out, layout="hf", **options)
        report = verify(out, src, tokens=16)
        assert report.passed, (variant, report.worst)
        runners[variant] = report.runner
    assert runners["v4"].startswith("transformers (RwkvForCausalLM)")
    assert runners["v7"].startswith("transformers (RWKV7ForCausalLM)")
    assert runners["v6"].startswith("rwkv-convert runner")

    from safetensors.torch import load_file, save_file

    shard = next((tmp_path / "hf-v7").glob("*.safetensors"))
    tensors = load_file(shard)
    name = next(k for k in tensors if k.endswith("ffn.value.weight") or k.endswith("value.weight"))
    tensors[name] = tensors[name] * 1.05
    save_file(tensors, shard, metadata={"format": "pt"})
    report = verify(tmp_path / "hf-v7", fixture_path("v7", directory=fixture_dir), tokens=16)
    assert not report.passed and report.runner.startswith("transformers")
