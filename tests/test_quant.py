"""Weight schemes: the pip package's int8 (bit for bit, minus its NaN), the native kernel and its fallback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from rwkv_convert.quant import scheme_for
from rwkv_convert.quant.kernels import int8_library
from rwkv_convert.quant.rwkv_int8 import quantize_rwkv_int8


def package_quantize(w_out_in: torch.Tensor, atype: torch.dtype) -> dict:
    """The package's int8 formula as written in rwkv/model.py (RWKV.__init__), up to the division. The real
    package is compared bit for bit in test_pip_format.py; this copy only shows where it yields NaN."""
    w = w_out_in.t().float()
    if w.shape[0] > w.shape[1]:
        my = torch.amin(w, dim=1).unsqueeze(1)
        w = w - my
        mx = torch.amin(w, dim=0)
        w = w - mx
    else:
        mx = torch.amin(w, dim=0)
        w = w - mx
        my = torch.amin(w, dim=1).unsqueeze(1)
        w = w - my
    rx = torch.amax(w, dim=0)
    w = w / rx
    ry = torch.amax(w, dim=1).unsqueeze(1)
    w = w / ry
    return {"w": w, "rx": rx, "ry": ry}


@pytest.mark.parametrize("shape,case", [
    ((96, 64), "constant output row"), ((64, 64), "constant output row"),  # columns of W.T go first here
    ((96, 64), "input column at every minimum"), ((64, 96), "input column at every minimum"),
    ((64, 64), "input column at every minimum"),
])
def test_degenerate_rows_and_columns_quantize_without_nan(shape, case):
    w = torch.randn(shape)
    if case == "constant output row":
        w[3, :] = 0.25  # a constant column of W.T: its max after the min is subtracted is 0
    else:
        w[:, 5] = -100.0  # a row of W.T that is every column's minimum: all zero after subtraction
    assert torch.isnan(package_quantize(w, torch.float32)["w"]).any()  # what the package would store
    deq = scheme_for("i8").quantize(w, torch.float32).dequantize()
    assert torch.isfinite(deq).all()
    if case == "constant output row":
        assert torch.allclose(deq[3, :], w[3, :], atol=1e-6)
    else:
        assert torch.allclose(deq[:, 5], w[:, 5], rtol=1e-3)


def test_quantization_of_regular_matrices_is_unchanged_by_the_nan_fix():
    w = torch.randn(80, 48)
    parts = quantize_rwkv_int8(w, torch.float32)
    ref = package_quantize(w, torch.float32)
    q = torch.clip(torch.floor(ref["w"] * 256), 0, 255).to(torch.uint8)
    assert torch.equal(parts["q"], q)
    assert torch.equal(parts["rx"], ref["rx"] / 16) and torch.equal(parts["ry"], ref["ry"] / 16)


@pytest.mark.parametrize("atype", [torch.float32, torch.float16, torch.bfloat16])
def test_one_token_matmul_equals_the_dequantised_matrix(atype):
    torch.manual_seed(0)
    w = torch.randn(300, 200)
    qw = scheme_for("i8").quantize(w, atype)
    x = torch.randn(1, 200).to(atype)
    expected = (x.float() @ qw.dequantize().t()).to(atype)
    assert int8_library() is not None  # the kernel builds here (a C compiler is part of the CI machine)
    out = qw.matmul(x)
    assert out.dtype == atype and out.shape == (1, 300)
    assert (out.float() - expected.float()).abs().max().item() <= 2e-3 * expected.float().abs().max().item()
    seq = qw.matmul(torch.cat([x, x]))  # sequences take the dequantise-once path
    assert torch.allclose(seq[0].float(), out[0].float(), atol=1e-2 if atype != torch.float32 else 1e-4)


@pytest.mark.slow
def test_without_the_native_kernel_the_torch_path_gives_the_same_logits(fixture_dir):
    from rwkv_convert.fixtures import fixture_path

    path = fixture_path("v6", directory=fixture_dir)
    code = ("import sys, torch, rwkv_convert; m = rwkv_convert.load(sys.argv[1], 'cpu fp32i8');"
            "_, s = m.forward([1, 2, 3]); torch.save(m.forward([4], s)[0], sys.argv[2])")
    outs = []
    for flag in ("0", "1"):
        target = fixture_dir / f"i8-native-{flag}.pt"
        env = dict(os.environ, RWKV_CONVERT_NO_NATIVE=flag)
        subprocess.run([sys.executable, "-c", code, str(path), str(target)], check=True, env=env)
        outs.append(torch.load(target))
    assert (outs[0] - outs[1]).abs().max().item() <= 1e-4
