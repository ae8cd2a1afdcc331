"""`--to mlx`: mlx-lm directories of RWKV-7, float and in MLX's own affine groups (plain: mlx.core.quantize's
rounding and mlx_lm.convert's file, tensor for tensor; calibrated: lower error), run in mlx-lm itself (mlx[cpu])."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import rwkv_convert
from rwkv_convert.describe import describe_path
from rwkv_convert.fixtures import fixture_path
from rwkv_convert.quant import mlx_groups
from rwkv_convert.runtimes import mlx_lm as mlx_runtime
from rwkv_convert.verify import format_report, verify

from .test_cli import assert_one_line_error, cli

REQUIRED = os.environ.get("RWKV_CONVERT_REQUIRE_MLX") == "1"  # CI: a missing client fails, not skips
needs_mlx = pytest.mark.skipif(importlib.util.find_spec("mlx_lm") is None and not REQUIRED,
                               reason=f"mlx-lm is not installed: {mlx_runtime.CLIENT.install}")
BUNDLED = "bundled:v7"


@needs_mlx
@pytest.mark.parametrize("bits", mlx_groups.BITS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plain_groups_are_mlx_quantize_bit_for_bit(bits, dtype):
    import mlx.core as mx

    weight = (torch.randn(24, 256, generator=torch.Generator().manual_seed(bits)) * 0.1).to(dtype).float()
    weight[3, :64] = 0.25  # a constant group
    for group in mlx_groups.GROUP_SIZES:
        packed, scales, biases, held = mlx_groups.quantize_plain(weight, bits, group, torch.float32)
        theirs = mx.quantize(mx.array(weight.numpy()), group_size=group, bits=bits)
        assert np.array_equal(packed.numpy().view(np.uint32), np.array(theirs[0]))
        assert np.array_equal(scales.numpy(), np.array(theirs[1]))
        assert np.array_equal(biases.numpy(), np.array(theirs[2]))
        dequantized = mx.dequantize(*theirs, group_size=group, bits=bits)
        assert np.array_equal(held.numpy(), np.array(dequantized))
        levels = mlx_groups.unpack(packed.numpy().view(np.uint32), bits)
        assert np.array_equal(mlx_groups.pack(levels, bits), packed.numpy().view(np.uint32))


@needs_mlx
@pytest.mark.parametrize("shape", [{}, {"n_embd": 192, "head_size": 32, "n_layer": 3, "vocab": 300}])
def test_fp32_export_matches_the_reference_in_mlx_lm(fixture_dir, tmp_path, shape):
    src = fixture_path("v7", directory=fixture_dir, **shape)
    rwkv_convert.convert(src, "mlx", tmp_path / "m")
    report = verify(tmp_path / "m", src, tokens=16)
    assert report.passed and report.runner.startswith("mlx-lm (float32"), format_report(report)
    assert max(row.max_abs for row in report.rows.values()) <= 1e-4, format_report(report)


@needs_mlx
def test_mlx_lm_loads_it_with_its_tokenizer_and_chat_template(tmp_path):
    import mlx_lm

    rwkv_convert.convert(BUNDLED, "mlx", tmp_path / "m", quant="q8")
    model, tokenizer = mlx_lm.load(str(tmp_path / "m"), tokenizer_config={"trust_remote_code": True})
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert "hi" in chat
    text = mlx_lm.generate(model, tokenizer, prompt="def ", max_tokens=8, verbose=False)
    assert isinstance(text, str) and len(text) > 0


@needs_mlx
def test_plain_q4_is_mlx_lm_converts_own_file(fixture_dir, tmp_path):
    import mlx_lm

    src = fixture_path("v7", directory=fixture_dir)
    rwkv_convert.convert(src, "hf", tmp_path / "hf")
    mlx_lm.convert(str(tmp_path / "hf"), str(tmp_path / "theirs"), quantize=True, q_bits=4, q_group_size=64,
                   trust_remote_code=True)
    rwkv_convert.convert(src, "mlx", tmp_path / "ours", quant="q4")
    theirs, ours = (load_file(tmp_path / d / "model.safetensors") for d in ("theirs", "ours"))
    assert set(theirs) == set(ours)
    assert all(theirs[k].dtype == ours[k].dtype and np.array_equal(theirs[k], ours[k]) for k in theirs)
    config = [json.loads((tmp_path / d / "config.json").read_text()) for d in ("theirs", "ours")]
    assert config[0]["quantization"] == config[1]["quantization"]


@needs_mlx
def test_calibrated_q4_passes_in_mlx_lm_and_is_closer_than_plain(tmp_path):
    rwkv_convert.convert(BUNDLED, "mlx", tmp_path / "plain", quant="q4")
    rwkv_convert.convert(BUNDLED, "mlx", tmp_path / "cal", quant="q4", calibration="bundled")
    plain, cal = verify(tmp_path / "plain", BUNDLED, tokens=32), verify(tmp_path / "cal", BUNDLED, tokens=32)
    assert plain.passed and cal.passed and cal.runner.startswith("mlx-lm")
    kl = {name: sum(r.kl for r in report.rows.values()) for name, report in (("plain", plain), ("cal", cal))}
    assert kl["cal"] < kl["plain"], kl
    sizes = [sum(f.stat().st_size for f in (tmp_path / d).iterdir() if f.suffix == ".safetensors")
             for d in ("plain", "cal")]
    assert sizes[0] == sizes[1]  # the same groups: only their values differ


@needs_mlx
def test_noise_in_mlx_fails(fixture_dir, tmp_path):
    src = fixture_path("v7", directory=fixture_dir)
    rwkv_convert.convert(src, "mlx", tmp_path / "m")
    weights = load_file(tmp_path / "m" / "model.safetensors")
    rng = np.random.default_rng(2)
    for name, t in weights.items():
        if t.ndim == 2 and "proj" in name:
            weights[name] = (rng.standard_normal(t.shape) * t.std()).astype(t.dtype)
    save_file(weights, tmp_path / "m" / "model.safetensors", metadata={"format": "mlx"})
    report = verify(tmp_path / "m", src, tokens=16)
    assert not report.passed and report.runner.startswith("mlx-lm"), format_report(report)


def test_what_mlx_cannot_hold_is_refused_in_one_line(fixture_dir, tmp_path):
    for variant, reason in (("v6", "mlx-lm runs RWKV-7 only"), ("v7-deepembed", "per-token tables")):
        proc = cli("convert", fixture_path(variant, directory=fixture_dir), "--to", "mlx", "-o", tmp_path / variant)
        assert_one_line_error(proc, reason)
        assert not (tmp_path / variant).exists()
    proc = cli("convert", BUNDLED, "--to", "mlx", "--calibration", "bundled", "-o", tmp_path / "c")
    assert_one_line_error(proc, "--calibration chooses quantized groups: give --quant")
    proc = cli("convert", BUNDLED, "--to", "mlx", "--quant", "q4_k", "-o", tmp_path / "k")
    assert_one_line_error(proc, "GGUF Q4_K.*which --quant cannot store")


def test_our_reader_runs_it_and_a_missing_client_is_said(tmp_path, monkeypatch):
    rwkv_convert.convert(BUNDLED, "mlx", tmp_path / "m", quant="q6", group_size=32)
    ours = verify(tmp_path / "m", BUNDLED, tokens=16, runner="ours")
    assert ours.passed and ours.scheme == "q5/q4", format_report(ours)
    monkeypatch.setattr(type(mlx_runtime.CLIENT), "version", lambda self: None)  # the fault: mlx-lm missing
    report = verify(tmp_path / "m", BUNDLED, tokens=16)
    assert report.passed and "mlx-lm is not installed" in format_report(report).splitlines()[-1]
    assert "mlx-lm" in describe_path(tmp_path / "m")["format"]  # inspect reads it


@needs_mlx
def test_a_release_builds_and_verifies_an_mlx_artifact_in_mlx_lm(tmp_path):
    release = tmp_path / "release.toml"
    release.write_text('[release]\ntokens = 16\n[sources]\nv7 = "bundled:v7"\n'
                       '[[artifact]]\nname = "mlx-q4-cal"\nto = "mlx"\nquant = "q4"\ncalibration = "bundled"\n')
    proc = cli("release", release, "--out", tmp_path / "out")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(next((tmp_path / "out").glob("*.json")).read_text())
    entry = report["artifacts"][0]
    assert entry["format"] == "mlx" and entry["status"] == "passed" and entry["runtime"].startswith("mlx-lm"), entry
    assert (tmp_path / "out" / "mlx-q4-cal" / "model.safetensors").is_file()


def test_calibration_by_rounding_alone_and_float_tables(tmp_path):
    """--calibration-method rounding (each group's importance-weighted fit, no GPTQ) and --tables float (the
    embedding and head left in --dtype): standard groups our reader reads back and verify passes."""
    out = rwkv_convert.convert(BUNDLED, "mlx", tmp_path / "m", quant="q4", calibration="bundled",
                               calibration_method="rounding", tables="float", dtype="fp16")
    weights = load_file(tmp_path / "m" / "model.safetensors")
    assert weights["lm_head.weight"].dtype == np.float16 and "lm_head.scales" not in weights
    assert weights["model.layers.0.attn.r_proj.weight"].dtype == np.uint32
    assert weights["model.layers.0.attn.r_proj.scales"].dtype == np.float16 and out
    assert verify(tmp_path / "m", BUNDLED, tokens=16, runner="ours").passed


@needs_mlx
def test_mlx_lm_gets_the_checked_files_under_our_names_not_the_users_folder(tmp_path, monkeypatch):
    import mlx_lm.utils

    rwkv_convert.convert(BUNDLED, "mlx", tmp_path / "user's model", quant="q8")
    (tmp_path / "user's model" / "model_extra.py").write_text("raise SystemExit('never run')\n")
    seen = []
    load = mlx_lm.utils.load_model
    monkeypatch.setattr(mlx_lm.utils, "load_model", lambda path, *a, **k: (seen.append(sorted(
        p.name for p in Path(path).iterdir())), seen.append(str(path)), load(path, *a, **k))[2])
    assert verify(tmp_path / "user's model", BUNDLED, tokens=8).passed
    assert seen[0] == ["config.json", "model.safetensors"] and str(tmp_path) not in seen[1]
