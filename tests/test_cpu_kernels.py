"""The runner's C recurrences (rwkv_convert/cpu/wkv_cpu.c) against the torch loops they replace, on the CPU:
same outputs and states, inputs untouched, and a whole model the same with and without them."""

from __future__ import annotations

import pytest
import torch

from rwkv_convert.arch import v4, v5, v7
from rwkv_convert.cpu import ops


def _close(a, b, tol=2e-5):
    scale = b.abs().max().clamp_min(1.0)
    assert ((a - b).abs().max() / scale).item() <= tol, ((a - b).abs().max().item(), scale.item())


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


def test_the_kernels_build_here():
    x = torch.zeros(1, 1, 4)
    assert ops.wkv7(x, x + 1, x, x, x, x, torch.zeros(1, 4, 4)) is not None  # a C compiler is on CI machines


@pytest.mark.parametrize("T", [1, 37])
def test_wkv4_matches_torch(T):
    C = 96
    w, u = -torch.exp(torch.randn(C)), torch.randn(C)
    k, v = torch.randn(T, C), torch.randn(T, C)
    state = [torch.randn(C), torch.rand(C) + 0.1, torch.randn(C)]
    before = [t.clone() for t in state]
    for got, want in zip(ops.wkv4(w, u, k, v, *state), v4.wkv4(w, u, k, v, *state), strict=True):
        _close(got, want)
    assert all(torch.equal(a, b) for a, b in zip(state, before, strict=True))


@pytest.mark.parametrize("N", [32, 64])
@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("T", [1, 40])
def test_wkv5_matches_torch(N, per_token, T):
    H = 3
    r, k, v = torch.randn(T, H, N), torch.randn(T, H, N), torch.randn(T, H, N)
    w = torch.rand(T, H, N, 1) if per_token else torch.rand(H, N, 1)
    u, s = torch.randn(H, N, 1), torch.randn(H, N, N)
    s_before = s.clone()
    y, s_new = ops.wkv5(r, k, v, w, u, s)
    y_ref, s_ref = v5.wkv(r, k, v, w, u, s)
    _close(y, y_ref)
    _close(s_new, s_ref)
    assert torch.equal(s, s_before)


def test_wkv5_per_head_decay_broadcasts():  # v5.0-style decay and bonus of one value per head: [H, 1, 1]
    T, H, N = 9, 2, 16
    r, k, v = torch.randn(T, H, N), torch.randn(T, H, N), torch.randn(T, H, N)
    w, u, s = torch.rand(H, 1, 1), torch.randn(H, 1, 1), torch.randn(H, N, N)
    for got, want in zip(ops.wkv5(r, k, v, w, u, s), v5.wkv(r, k, v, w, u, s), strict=True):
        _close(got, want)


@pytest.mark.parametrize("N", [16, 64, 128])
@pytest.mark.parametrize("T", [1, 40])
def test_wkv7_matches_torch(N, T):
    H = 3
    r, k, v = torch.randn(T, H, N), torch.randn(T, H, N), torch.randn(T, H, N)
    w = torch.exp(-0.6 * torch.rand(T, H, N))
    kk = torch.nn.functional.normalize(torch.randn(T, H, N), dim=-1)
    a = torch.rand(T, H, N)
    s = torch.randn(H, N, N)
    s_before = s.clone()
    y, s_new = ops.wkv7(r, w, k, v, kk, a, s)
    y_ref, s_ref = v7.wkv7(r, w, k, v, kk, a, s)
    _close(y, y_ref)
    _close(s_new, s_ref)
    assert torch.equal(s, s_before)


@pytest.mark.parametrize("version", ["v5", "v7"])
def test_as_accurate_as_the_torch_loop_against_fp64(version):
    """Summation order differs from torch's, so outputs differ in the last bits; the error against the same
    recurrence in fp64, over a long sequence, must be no larger than the torch loop's own."""
    T, H, N = 512, 2, 64
    r, k, v = torch.randn(T, H, N), torch.randn(T, H, N), torch.randn(T, H, N)
    s = torch.zeros(H, N, N)
    if version == "v7":
        args = (r, torch.exp(-0.6 * torch.rand(T, H, N)), k, v,
                torch.nn.functional.normalize(torch.randn(T, H, N), dim=-1), torch.rand(T, H, N), s)
        torch_code, kernel = v7.wkv7, ops.wkv7
    else:
        args, torch_code, kernel = (r, k, v, torch.rand(T, H, N, 1), torch.randn(H, N, 1), s), v5.wkv, ops.wkv5
    exact = torch_code(*(t.double() for t in args))[0]
    error = {name: ((f(*args)[0].double() - exact).norm() / exact.norm()).item()
             for name, f in (("torch", torch_code), ("C", kernel))}
    assert error["C"] <= 2 * error["torch"], error


def test_non_contiguous_inputs_are_read_as_the_torch_code_reads_them():
    T, H, N = 12, 2, 32
    big = torch.randn(T, H, 2 * N)
    r, k, v = big[..., :N], big[..., N:], torch.randn(T, H, N)  # strided views, as the runner passes them
    w = torch.exp(-0.6 * torch.rand(T, H, N))
    kk = torch.nn.functional.normalize(torch.randn(T, H, N), dim=-1)
    a, s = torch.rand(T, H, N), torch.randn(H, N, N)
    for got, want in zip(ops.wkv7(r, w, k, v, kk, a, s), v7.wkv7(r, w, k, v, kk, a, s), strict=True):
        _close(got, want)


def test_gpu_tensors_and_disabled_kernels_fall_back(monkeypatch):
    from rwkv_convert.cpu import build

    meta = torch.zeros(2, 1, 4, device="meta")
    assert ops.wkv7(meta, meta, meta, meta, meta, meta, torch.zeros(1, 4, 4, device="meta")) is None
    monkeypatch.setattr(build, "_loaded", {})
    monkeypatch.setenv("RWKV_CONVERT_NO_NATIVE", "1")
    x = torch.zeros(1, 1, 4)
    assert ops.wkv7(x, x, x, x, x, x, torch.zeros(1, 4, 4)) is None


@pytest.mark.parametrize("version", ["v4", "v5.0", "v5.2", "v6", "v7"])
def test_a_model_gives_the_same_logits_and_state_with_and_without_them(fixture_dir, version):
    from rwkv_convert.fixtures import fixture_path
    from rwkv_convert.formats.registry import read_checkpoint
    from rwkv_convert.runner import Model

    ckpt = read_checkpoint(fixture_path(version, directory=fixture_dir))
    tokens = [(7 * i + 3) % 256 for i in range(50)]
    (fast, fast_state), (slow, slow_state) = (Model(ckpt, "cpu fp32", kernels=kernels).forward(tokens, full_output=True)
                                              for kernels in ("auto", "torch"))
    _close(fast, slow, 1e-4)
    for a, b in zip(fast_state, slow_state, strict=True):
        _close(a.float(), b.float(), 1e-4)
