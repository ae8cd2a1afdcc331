"""Checkpoints other tools have changed: rwkv-quant-nv's quantized files (made here by the real tool) are
dequantized on read exactly as that tool defines them; other quantizers' parts, float8 weights without a
scale and other architectures (RWKV-8's ffn.enn) are refused in one line, never run."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import torch

import rwkv_convert
from rwkv_convert.fixtures import make_state_dict
from rwkv_convert.formats.registry import read_checkpoint

from .conftest import save_atomic, tokens_for
from .test_cli import assert_one_line_error, cli


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("foreign")
    return save_atomic(make_state_dict("v7", n_layer=2, n_embd=128, vocab=512), folder / "v7.pth")


def rwkv_quant(src, scheme: str, out):
    tool = shutil.which("rwkv-quant")
    if tool is None:
        pytest.skip("rwkv-quant-nv is not installed (pip install rwkv-quant-nv)")
    subprocess.run([tool, "q", "-m", str(src), "-o", str(out), "-s", scheme], check=True, capture_output=True,
                   timeout=300)
    return out


@pytest.mark.parametrize("scheme", ["fp8", "fp8_perchannel", "int8_symmetric"])
def test_rwkv_quant_files_are_read_as_the_tool_dequantizes_them(scheme, source, tmp_path):
    quantized = rwkv_quant(source, scheme, tmp_path / f"{scheme}.pth")
    stored = torch.load(quantized, weights_only=True)
    ckpt = read_checkpoint(quantized)
    assert ckpt.unused_keys == [] and ckpt.spec.version == "7"
    expected = {}
    for name, t in stored.items():
        if not isinstance(t, torch.Tensor) or name.endswith(".fp8_scale"):
            continue
        scale = stored.get(name + ".fp8_scale")
        if scale is not None:  # the tool's definition: weight = stored * scale (per tensor, or per output row)
            assert t.dtype in (torch.float8_e4m3fn, torch.int8)
            t = t.float() * (scale.reshape(-1, 1) if scale.numel() > 1 else scale)
        expected[name] = t
        assert torch.equal(ckpt.tensors[name], t), name
    # runs exactly as the same weights stored as floats, and converts
    tokens = tokens_for(512)[:16]
    plain = save_atomic(expected, tmp_path / "plain.pth")
    assert torch.equal(rwkv_convert.load(quantized).forward(tokens, full_output=True)[0],
                       rwkv_convert.load(plain).forward(tokens, full_output=True)[0])
    proc = cli("inspect", quantized)
    assert proc.returncode == 0 and "unused" not in proc.stdout.lower(), proc.stdout
    assert cli("convert", quantized, "--to", "gguf", "-o", tmp_path / "q.gguf").returncode == 0


def test_rwkv_quant_float_schemes_read_as_floats_with_a_note(source, tmp_path):
    quantized = rwkv_quant(source, "int4_groupwise_128", tmp_path / "int4.pth")
    proc = cli("inspect", quantized)
    assert proc.returncode == 0 and "note: " in proc.stderr and "int4_groupwise_128" in proc.stderr


def _changed(source, tmp_path, name: str, edit) -> object:
    sd = torch.load(source, weights_only=True)
    edit(sd)
    return save_atomic(sd, tmp_path / f"{name}.pth")


def _fp8_no_scale(sd):
    sd["blocks.0.att.key.weight"] = sd["blocks.0.att.key.weight"].to(torch.float8_e4m3fn)


def _gptq(sd):  # GPTQ-style parts beside the float weight
    sd["blocks.0.att.key.qweight"] = torch.zeros(16, 128, dtype=torch.int32)
    sd["blocks.0.att.key.qzeros"] = torch.zeros(1, 16, dtype=torch.int32)
    sd["blocks.0.att.key.scales"] = torch.ones(1, 128)


def _int8_other_tool(sd):
    w = sd["blocks.1.ffn.key.weight"]
    sd["blocks.1.ffn.key.weight"] = (w / w.abs().max() * 127).round().to(torch.int8)
    sd["blocks.1.ffn.key.weight.int8_scale"] = w.abs().max() / 127


def _packed_int4(sd):
    sd["blocks.0.att.value.weight"] = torch.zeros(128, 64, dtype=torch.uint8)


def _rwkv8(sd):
    sd["blocks.0.ffn.enn.weight"] = torch.zeros(512, 128)


def _unknown_family(sd):
    sd["blocks.0.mem.gate.weight"] = torch.zeros(128, 128)
    sd["blocks.1.mem.gate.weight"] = torch.zeros(128, 128)


def _hybrid_v6_layer(sd):
    sd["blocks.1.att.time_maa_x"] = torch.zeros(1, 1, 128)


def _scale_beside(sd):
    sd["blocks.0.att.output.weight_scale"] = torch.ones(128)


@pytest.mark.parametrize("name,edit,pattern", [
    ("fp8-no-scale", _fp8_no_scale, "float8_e4m3fn with no scale beside it"),
    ("gptq", _gptq, "blocks.0.att.key.q(weight|zeros)|blocks.0.att.key.scales"),
    ("int8-other", _int8_other_tool, r"int8_scale is the part of a quantized blocks.1.ffn.key.weight"),
    ("packed-int4", _packed_int4, "blocks.0.att.value.weight has shape"),
    ("rwkv8", _rwkv8, "blocks.0.ffn.enn.weight is not part of RWKV-7: this is RWKV-8"),
    ("unknown-family", _unknown_family, r"blocks.0.mem.gate.weight is not part of RWKV-7: this is another"
                                        r" architecture, a hybrid or a variant .* \(2 such tensors,"
                                        r" in blocks.i.mem.gate"),
    ("hybrid-v6-layer", _hybrid_v6_layer, "blocks.1.att.time_maa_x is not part of RWKV-7"),
    ("scale-beside", _scale_beside, "weight_scale is the part of a quantized"),
])
def test_other_tools_quantization_and_other_architectures_are_refused(name, edit, pattern, source, tmp_path):
    changed = _changed(source, tmp_path, name, edit)
    for args in (["inspect", changed], ["run", changed, "--tokens", "2"],
                 ["convert", changed, "--to", "gguf", "-o", tmp_path / "out.gguf"],
                 ["verify", changed, "--reference", source, "--tokens", "4"]):
        assert_one_line_error(cli(*args), pattern)
    assert not (tmp_path / "out.gguf").exists()
