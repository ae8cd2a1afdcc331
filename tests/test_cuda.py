"""CUDA kernels and the runner on cuda plans. Tests marked `cuda` need a GPU (skipped otherwise; run them with
scripts/gpu-check.sh on a GPU machine); the rest run everywhere: the fallback when kernels cannot be built,
and an nvcc compile check of the kernels for sm_90 when nvcc is installed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

import rwkv_convert
from rwkv_convert.arch import v4, v5, v7
from rwkv_convert.bounds import scheme_label, tolerance_for
from rwkv_convert.cuda import build, ops, selftest
from rwkv_convert.cuda.build import SOURCE, compile_flags
from rwkv_convert.fixtures import VARIANTS, fixture_path
from rwkv_convert.metrics import compare
from rwkv_convert.quant.rwkv_int8 import RwkvInt8Scheme
from rwkv_convert.runner import Model, recurrence_for
from rwkv_convert.strategy import allocate, parse_strategy

from .conftest import tokens_for

GPU = torch.cuda.is_available()
cuda = pytest.mark.skipif(not GPU, reason="needs a CUDA GPU (scripts/gpu-check.sh)")
SEED = int(os.environ.get("RWKV_CONVERT_TEST_SEED") or int.from_bytes(os.urandom(2), "little"))  # in messages


# ---- everywhere ----------------------------------------------------------------------------------------
def test_cpu_tensors_take_the_torch_path():
    t = torch.zeros(2, 1, 64)
    assert ops.wkv7(t, t, t, t, t, t, torch.zeros(1, 64, 64)) is None
    assert ops.wkv5(t, t, t, torch.ones(1, 64, 1), torch.zeros(1, 64, 1), torch.zeros(1, 64, 64)) is None
    assert ops.wkv4(*(torch.zeros(8) for _ in range(2)), torch.zeros(2, 8), torch.zeros(2, 8),
                    *(torch.zeros(8) for _ in range(3))) is None


def test_a_failed_build_is_one_line_and_falls_back(tmp_path):
    """A real fault: no nvcc on PATH and no CUDA_HOME. build_extension must say so in one line, not raise."""
    code = ("from rwkv_convert.cuda.build import build_extension; import sys;"
            " sys.exit(0 if build_extension((9, 0)) is None else 3)")
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "CUDA_PATH")}
    env.update(PATH="/usr/bin:/bin", CUDA_HOME=str(tmp_path / "no-cuda"), RWKV_CONVERT_CACHE=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "CUDA kernels unavailable" in lines[0] and "torch fallback" in lines[0], proc.stderr


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_kernels_compile_for_sm_90(tmp_path):
    """What the GPU build compiles, with the same flags, for the H100/H200 architecture (object file only: a
    CPU torch has no CUDA libraries to link)."""
    include = Path(torch.__file__).parent / "include"
    cmd = ["nvcc", *compile_flags(9, 0), "-std=c++17", "-c", str(SOURCE), "-o", str(tmp_path / "k.o"),
           f"-I{include}", f"-I{include / 'torch/csrc/api/include'}", f"-I{sysconfig.get_paths()['include']}",
           "-DTORCH_EXTENSION_NAME=rwkv_kernels", "-Xcompiler", "-fPIC"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "k.o").stat().st_size > 0


# ---- on a GPU: kernels against their torch fallbacks -----------------------------------------------------
@cuda
@pytest.mark.cuda
def test_the_self_test_passes_on_this_card_and_its_verdict_is_kept():
    card = torch.cuda.get_device_name()
    assert build.extension() is not None
    report = build.self_test_report()
    assert report and all(c.passed for c in report), selftest.format_checks(report or [], card)
    assert (build.build_directory(torch.cuda.get_device_capability()) / selftest.verdict_name(card)).exists()


def _rand(*shape, scale=1.0):
    return (torch.randn(*shape, device="cuda") * scale).float()


def _close(a, b, tol=1e-4):
    error = selftest.relative_error(a, b)  # |a - b| over max(1, |b|), as the self-test measures
    assert error <= tol, (error, b.abs().max().item())


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("T", [1, 37])
def test_wkv4_kernel_matches_torch(T):
    C = 96
    w, u = -torch.exp(_rand(C)), _rand(C)
    k, v = _rand(T, C), _rand(T, C)
    state = [_rand(C), _rand(C).abs() + 0.1, _rand(C)]
    got = ops.wkv4(w, u, k, v, *state)
    want = v4.wkv4(w, u, k, v, *state)  # the torch loop on the same GPU tensors
    for a, b in zip(got, want, strict=True):
        _close(a.cpu(), b.cpu())


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("N", [32, 64])
@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("T", [1, 40])
def test_wkv5_kernel_matches_torch(N, per_token, T):
    H = 3
    r, k, v = _rand(T, H, N), _rand(T, H, N), _rand(T, H, N)
    w = torch.rand(T, H, N, 1, device="cuda") if per_token else torch.rand(H, N, 1, device="cuda")
    u, s = _rand(H, N, 1), _rand(H, N, N)
    s_before = s.clone()
    y, s_new = ops.wkv5(r, k, v, w, u, s)
    y_ref, s_ref = v5.wkv(r, k, v, w, u, s)  # the torch loop on the same GPU tensors
    _close(y.cpu(), y_ref.cpu())
    _close(s_new.cpu(), s_ref.cpu())
    assert torch.equal(s, s_before)  # inputs untouched


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("N", [32, 64])
@pytest.mark.parametrize("T", [1, 40])
def test_wkv7_kernel_matches_torch(N, T):
    H = 3
    r, k, v = _rand(T, H, N), _rand(T, H, N), _rand(T, H, N)
    w = torch.exp(-0.6 * torch.rand(T, H, N, device="cuda"))
    kk = torch.nn.functional.normalize(_rand(T, H, N), dim=-1)
    a = torch.rand(T, H, N, device="cuda")
    s = _rand(H, N, N)
    y, s_new = ops.wkv7(r, w, k, v, kk, a, s)
    y_ref, s_ref = v7.wkv7(r, w, k, v, kk, a, s)  # the torch loop on the same GPU tensors
    _close(y.cpu(), y_ref.cpu())
    _close(s_new.cpu(), s_ref.cpu())


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("T", [1, 9])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_int8_kernels_match_the_dequantised_product(T, dtype):
    weight = RwkvInt8Scheme().quantize(torch.randn(768, 512) / 20, torch.float16).to("cuda")  # [out, in]
    x = torch.randn(T, 512, device="cuda").to(dtype)
    got = ops.int8_matmul(x, weight.q, weight._f32)
    want = (x.float() @ weight.dequantize().t()).to(dtype)
    _close(got.float(), want.float(), tol=1e-2 if dtype != torch.float32 else 1e-4)


# ---- on a GPU: the whole runner on cuda plans against the CPU reference ------------------------------------
CUDA_PLANS = ["cuda fp32", "cuda fp16", "cuda bf16", "cuda fp16i8", "cuda fp16 *3 -> cpu fp32", "cuda fp16 *2+"]


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("strategy", CUDA_PLANS)
def test_runner_on_cuda_plans_matches_the_cpu_reference(variant, strategy, fixture_dir):
    path = fixture_path(variant, directory=fixture_dir)
    reference = rwkv_convert.load(path)
    model = rwkv_convert.load(path, strategy)
    key, tol = tolerance_for({scheme_label(p) for p in allocate(parse_strategy(strategy), model.spec.n_layer)})
    tokens = tokens_for(model.spec.vocab_size, seed=SEED)  # fresh each run (RWKV_CONVERT_TEST_SEED repeats one)
    want = reference.forward(tokens, full_output=True)[0]
    seq = model.forward(tokens, full_output=True)[0].cpu()
    state, rows = None, []
    for t in tokens:  # one token at a time: the CUDA-graph path on single-GPU plans
        logits, state = model.forward([t], state)
        rows.append(logits.cpu())
    for got in (seq, torch.stack(rows)):
        max_abs, rel_l2, kl, top1 = compare(want, got)
        assert max_abs <= tol.max_abs and rel_l2 <= tol.rel_l2 and kl <= tol.kl and top1 >= tol.top1, \
            (key, max_abs, rel_l2, kl, top1, f"RWKV_CONVERT_TEST_SEED={SEED}")


@cuda
@pytest.mark.cuda
def test_cuda_graph_replay_equals_eager_steps(fixture_dir, monkeypatch):
    path = fixture_path("v7", directory=fixture_dir)
    graphed = rwkv_convert.load(path, "cuda fp16")
    monkeypatch.setenv("RWKV_CONVERT_CUDA_GRAPH", "0")
    eager = rwkv_convert.load(path, "cuda fp16")
    assert graphed._graph_capable and not eager._graph_capable
    sg = se = None
    for t in tokens_for(512)[:16]:
        a, sg = graphed.forward([t], sg)
        b, se = eager.forward([t], se)
        assert torch.allclose(a, b, atol=1e-2), (a - b).abs().max()
    kept = [t.clone() for t in sg]
    graphed.forward([5], sg)
    assert all(torch.equal(x, y) for x, y in zip(kept, sg, strict=True))  # the given state is not modified


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("variant", ["v4", "v5.2", "v6", "v7"])
def test_kernels_match_the_torch_path_on_the_same_gpu(variant, fixture_dir):
    """The runner with its kernels and with the torch code only, both on the GPU: only the recurrence differs."""
    ckpt = rwkv_convert.read_checkpoint(fixture_path(variant, directory=fixture_dir))
    tokens = tokens_for(ckpt.spec.vocab_size, seed=SEED)
    fast = Model(ckpt, "cuda fp32").forward(tokens, full_output=True)[0].cpu()
    plain = Model(ckpt, "cuda fp32", kernels="torch").forward(tokens, full_output=True)[0].cpu()
    assert compare(plain, fast)[0] <= 1e-3, f"RWKV_CONVERT_TEST_SEED={SEED}"


def test_the_runner_chooses_the_backend_not_the_version_module():
    assert recurrence_for(v7, "torch") is v7.wkv7
    t = torch.zeros(2, 1, 64)
    y, s = recurrence_for(v7, "auto")(t, t, t, t, t, t, torch.zeros(1, 64, 64))  # CPU tensors: the torch code
    assert y.shape == (2, 1, 64) and s.shape == (1, 64, 64)
