"""The runner's CPU forms of weights (rwkv_convert/quant/rows_cpu.c: Bf16RowsWeight, RwkvInt8Rows): the native
kernel against float64, every shape edge it has (rows not a multiple of its tile, widths not a multiple of its vector,
token counts around its block), and the runner holding an fp32 strategy's weights from a bf16 file as bf16
without changing its numbers."""

from __future__ import annotations

import pytest
import torch

from rwkv_convert.arch.common import PROJECTIONS_KEY, lora_product
from rwkv_convert.fixtures import fixture_path
from rwkv_convert.formats.registry import read_checkpoint
from rwkv_convert.quant import RwkvInt8Rows, RwkvInt8Scheme, RwkvInt8Weight, float_weights, held_for_cpu
from rwkv_convert.quant.float_weights import (
    Bf16LoraFactor,
    Bf16RowsProjections,
    Bf16RowsWeight,
    FloatWeight,
    StackedFloatWeight,
    held_lora_for_cpu,
)
from rwkv_convert.quant.kernels import bf16_matmul, rows_library
from rwkv_convert.runner import Model

SEED = 1234


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(SEED)


def test_the_kernel_builds_here():
    assert rows_library() is not None  # a C compiler is on CI machines


@pytest.mark.parametrize("T", [1, 2, 3, 4, 5, 9])
@pytest.mark.parametrize("M,N", [(1, 16), (13, 37), (64, 768), (7, 15), (130, 1024)])
def test_the_kernel_matches_float64(T, M, N):
    w = torch.randn(M, N).bfloat16()
    x = torch.randn(T, N)
    got = bf16_matmul(x, w)
    want = x.double() @ w.double().t()
    assert got.dtype == torch.float32 and got.shape == (T, M)
    # fp32 sums of N products: a few ulp of the sum of magnitudes
    bound = 4 * N * torch.finfo(torch.float32).eps * (x.abs().double() @ w.abs().double().t())
    assert ((got.double() - want).abs() <= bound + 1e-30).all()


@pytest.mark.parametrize("T", [1, 4, 5, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bf16_rows_multiply_like_the_widened_fp32_matrix(T, dtype):
    w = torch.randn(300, 96).bfloat16()
    held = Bf16RowsWeight(w.contiguous(), torch.float32)
    x = torch.randn(T, 96).to(dtype)
    want = torch.nn.functional.linear(x.float(), w.float())
    got = held.matmul(x)
    assert got.dtype == dtype and got.shape == (T, 300)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert ((got.float() - want).abs().max() / want.abs().max()).item() <= tol


def test_only_lossless_matrices_are_held_as_bf16(monkeypatch):
    exact = torch.randn(64, 32).bfloat16().float()
    assert isinstance(held_for_cpu(FloatWeight(exact)), Bf16RowsWeight)
    assert isinstance(held_for_cpu(FloatWeight(exact.bfloat16())), Bf16RowsWeight)
    inexact = exact.clone()
    inexact[3, 5] += 1e-4  # one value that bf16 cannot hold
    assert held_for_cpu(FloatWeight(inexact)).weight is inexact
    assert isinstance(held_for_cpu(FloatWeight(exact.half())), FloatWeight)  # fp16 is not widened here
    stacked = StackedFloatWeight(("a", "b"), torch.stack([exact.t(), exact.t()]).contiguous())
    projections = held_for_cpu(stacked)
    assert isinstance(projections, Bf16RowsProjections)
    x = torch.randn(1, 32)
    got = projections.matmul_many({"a": x, "b": x})
    assert torch.allclose(got["a"], x @ exact.t(), atol=1e-5)
    monkeypatch.setattr(float_weights, "rows_library", lambda: None)  # no compiler: fp32 stays fp32
    assert isinstance(held_for_cpu(FloatWeight(exact)), FloatWeight)


@pytest.mark.parametrize("T", [1, 3, 4, 6])
@pytest.mark.parametrize("out_features,in_features", [(13, 37), (96, 64), (5, 300)])
def test_int8_rows_multiply_like_the_package_form(T, out_features, in_features):
    package = RwkvInt8Scheme().quantize(torch.randn(out_features, in_features), torch.float32)
    rows = held_for_cpu(package)
    assert isinstance(rows, RwkvInt8Rows) and rows.nbytes == package.nbytes
    assert torch.equal(rows.dequantize(), package.dequantize())
    x = torch.randn(T, in_features)
    want = x.double() @ package.dequantize().double().t()
    got = rows.matmul(x)
    assert got.shape == (T, out_features)
    assert ((got.double() - want).abs().max() / want.abs().max()).item() <= 1e-5
    back = rows.to("meta")
    assert isinstance(back, RwkvInt8Weight) and back.q.shape == package.q.shape


def test_held_weights_go_back_to_the_scheme_dtype_off_the_cpu():
    held = Bf16RowsWeight(torch.randn(8, 16).bfloat16(), torch.float32)
    moved = held.to("meta")
    assert isinstance(moved, FloatWeight) and moved.weight.dtype == torch.float32
    assert held.to("cpu") is held


@pytest.mark.parametrize("version", ["v5.2", "v6", "v7"])
def test_cpu_fp32_on_a_bf16_file_holds_the_file_size_and_gives_the_same_logits(fixture_dir, version, monkeypatch):
    ckpt = read_checkpoint(fixture_path(version, "bf16", directory=fixture_dir))
    held = Model(ckpt, "cpu fp32")
    matrices = [v for lw in held.layers for k, v in lw.items()
                if k in held.module.MATRICES or k == PROJECTIONS_KEY] + [held.head]
    assert all(isinstance(v, (Bf16RowsWeight, Bf16RowsProjections)) for v in matrices)
    file_bytes = sum(t.numel() * t.element_size() for k, t in ckpt.tensors.items()
                     if k.split(".", 2)[-1] in held.module.MATRICES or k == "head.weight")
    assert sum(v.nbytes for v in matrices) == file_bytes
    monkeypatch.setattr("rwkv_convert.runner.held_for_cpu", lambda v: v)
    plain = Model(ckpt, "cpu fp32")
    assert all(isinstance(lw["ffn.key.weight"], FloatWeight) for lw in plain.layers)
    tokens = [(5 * i + 1) % 256 for i in range(20)]
    for chunks in ([tokens], [[t] for t in tokens[:6]]):
        a_state = b_state = None
        for chunk in chunks:
            a, a_state = held.forward(chunk, a_state, full_output=True)
            b, b_state = plain.forward(chunk, b_state, full_output=True)
            assert ((a - b).abs().max() / b.abs().max()).item() <= 1e-5


@pytest.mark.parametrize("dtype,strategy", [("bf16", "cpu fp32"), ("bf16", "cpu bf16"), ("fp32", "cpu fp32"),
                                            ("bf16", "cpu fp32i8")])
def test_plan_counts_the_matrices_as_the_runner_holds_them(fixture_dir, dtype, strategy):
    from rwkv_convert.plan import make_plan

    ckpt = read_checkpoint(fixture_path("v7", dtype, directory=fixture_dir))
    model = Model(ckpt, strategy)
    held = sum(v.nbytes for lw in model.layers for k, v in lw.items()
               if k in model.module.MATRICES or k == PROJECTIONS_KEY) + model.head.nbytes
    plan = make_plan(ckpt.spec, ckpt.shapes, strategy)
    matrix_slots = {f"blocks.{i}.{name}": str(i) for i in range(ckpt.spec.n_layer) for name in model.module.MATRICES}
    planned = 0
    for key, slot in [*matrix_slots.items(), ("head.weight", "head")]:
        if key in ckpt.shapes:
            p = next(s for s in plan.slots if s.slot == slot)
            rows, cols = ckpt.shapes[key]
            per = {"fp32": 4, "bf16": 2}.get(p.weights)
            if per is None:  # int8: q plus the four companions in the activation dtype
                planned += rows * cols + 2 * (rows + cols) * 4
            else:
                bf16_held = p.weights == "bf16" or dtype == "bf16"
                planned += rows * cols * (2 if bf16_held else per)
    assert planned == held
    assert any("held as bf16" in n for n in plan.notes) == (strategy == "cpu fp32" and dtype == "bf16")


@pytest.mark.parametrize("T", [1, 3, 7])
@pytest.mark.parametrize("atype", [torch.float32, torch.bfloat16])
def test_lora_factors_held_as_bf16_rows_multiply_like_the_factor(T, atype):
    factor = torch.randn(96, 24).bfloat16().float()  # [in, out] with bf16 values, as from a bf16 file
    held = held_lora_for_cpu(factor, atype)
    assert isinstance(held, Bf16LoraFactor) and held.nbytes == factor.numel() * 2
    x = torch.randn(T, 96).to(atype)
    got = lora_product(x, held)
    want = x.float() @ factor
    assert got.dtype == atype and got.shape == want.shape
    tol = 1e-5 if atype == torch.float32 else 1e-2
    assert ((got.float() - want).abs().max() / want.abs().max()).item() <= tol


def test_lora_factors_that_are_not_bf16_numbers_stay_tensors():
    factor = torch.randn(64, 16)  # fp32 values: bf16 rows would round them
    assert held_lora_for_cpu(factor, torch.float32) is factor
    widened = held_lora_for_cpu(factor.half(), torch.float16)  # a fp16 layer: fp32, small matmuls are faster so
    assert isinstance(widened, torch.Tensor) and widened.dtype == torch.float32
    batched = torch.randn(5, 8, 64).bfloat16()  # v6's [5, in, out] factor stays a tensor (a batched matmul)
    assert isinstance(held_lora_for_cpu(batched, torch.bfloat16), torch.Tensor)
