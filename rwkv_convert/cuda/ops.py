"""The runner's CUDA fast paths. Each returns None when the kernels cannot run these tensors (CPU tensors, no
GPU, a failed build or self-test, an unsupported head size), and the caller then runs its torch code, which has
the same semantics (rwkv_convert/arch/v4.py, v5.py, v7.py; quant/rwkv_int8.py). Inputs are never modified: the
kernels update state copies in place. `ext` picks the kernels' build: by default the GPU extension for CUDA
tensors; the tests and the self-test pass the CPU build (on_cpu.KernelsOnCpu) for CPU tensors."""

from __future__ import annotations

import torch

from . import HEAD_SIZES
from .build import extension


def _ext(t: torch.Tensor):
    return extension() if t.is_cuda else None


def _stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream().cuda_stream if t.is_cuda else 0


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.float().contiguous()


def wkv4(w, u, k, v, aa, bb, pp, ext=None):
    """RWKV-4 over T tokens: w, u [C]; k, v [T, C]; state aa, bb, pp [C]. -> (y [T, C], aa, bb, pp)."""
    ext = _ext(k) if ext is None else ext
    if ext is None:
        return None
    aa, bb, pp = (_f32(t).clone() for t in (aa, bb, pp))
    y = ext.wkv4(_f32(w), _f32(u), _f32(k), _f32(v), aa, bb, pp, _stream(k))
    return y, aa, bb, pp


def wkv5(r, k, v, w, u, s, ext=None):
    """RWKV-5.x/6 over T tokens, bonus included: r, k, v [T, H, N]; w [H, N|1, 1] (fixed) or [T, H, N, 1]
    (per token); u [H, N|1, 1]; s [H, N_key, N_value]. -> (y [T, H, N], s)."""
    ext = _ext(r) if ext is None else ext
    if ext is None or r.shape[-1] not in HEAD_SIZES:
        return None
    H, N = r.shape[1], r.shape[2]
    w = w.squeeze(-1).expand(*w.shape[:-3], H, N) if w.dim() == 4 else w.expand(H, N, 1).reshape(H, N)
    u = u.expand(H, N, 1).reshape(H, N)
    s = _f32(s).clone()
    y = ext.wkv5(_f32(r), _f32(k), _f32(v), _f32(w), _f32(u), s, _stream(r))
    return y, s


# From this many tokens the chunked kernel (prefill) runs instead of the token-by-token one. Not yet measured on
# a card (benchmarks/gpu-notes.md): one chunk's worth, so that decoding and short calls keep the serial kernel.
CHUNKED_FROM_TOKENS = 32


def wkv7(r, w, k, v, kk, a, s, ext=None):
    """RWKV-7 over T tokens: r, w, k, v, kk, a [T, H, N]; s [H, N_value, N_key]. -> (y [T, H, N], s).
    Prefills of CHUNKED_FROM_TOKENS or more go through the chunked kernel (arch/v7.py's wkv7_chunked)."""
    ext = _ext(r) if ext is None else ext
    if ext is None or r.shape[-1] not in HEAD_SIZES:
        return None
    s = _f32(s).clone()
    kernel = ext.wkv7_chunked if r.shape[0] >= CHUNKED_FROM_TOKENS else ext.wkv7
    y = kernel(*(_f32(t) for t in (r, w, k, v, kk, a)), s, _stream(r))
    return y, s


def int8_matmul(x: torch.Tensor, q: torch.Tensor, companions: list[torch.Tensor], ext=None):
    """x [T, in] @ the pip-scheme int8 matrix (q [in, out] uint8; mx, rx, my, ry flat fp32) -> [T, out] in
    x's dtype: one token through the GEMV kernel, more through one dequantisation and a cuBLAS matmul."""
    ext = _ext(x) if ext is None else ext
    if ext is None or q.shape[1] % 4:
        return None
    mx, rx, my, ry = companions
    if x.shape[0] == 1:
        return ext.int8_gemv(_f32(x[0]), q.contiguous(), mx, rx, my, ry, _stream(x)).to(x.dtype).unsqueeze(0)
    return x @ ext.int8_dequant(q.contiguous(), mx, rx, my, ry, x.dtype, _stream(x))
