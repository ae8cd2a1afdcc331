"""The runner's CPU fast paths for the recurrences (wkv_cpu.c). Like cuda/ops.py, each returns None when the
kernel cannot run these tensors (GPU tensors, no compiler, RWKV_CONVERT_NO_KERNELS=1), and the caller then
runs its torch code, which has the same semantics (rwkv_convert/arch/v4.py, v5.py, v7.py). Inputs are never
modified: the kernel updates a copy of the state."""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from .build import library

SOURCE = Path(__file__).with_name("wkv_cpu.c")
MAX_HEAD_SIZE = 1024  # wkv_cpu.c's scratch row for RWKV-7


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.rwkv_wkv4.argtypes = [p] * 8 + [i64, i64, c_int]
    lib.rwkv_wkv5.argtypes = [p] * 7 + [i64, i64, i64, c_int, c_int]
    lib.rwkv_wkv7.argtypes = [p] * 8 + [i64, i64, i64, c_int]
    for f in (lib.rwkv_wkv4, lib.rwkv_wkv5, lib.rwkv_wkv7):
        f.restype = None


def _lib(t: torch.Tensor):
    return library(SOURCE, _declare, "recurrence kernels") if t.device.type == "cpu" else None


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.float().contiguous()


def _threads(units: int) -> int:
    return max(1, min(torch.get_num_threads(), units))


def wkv4(w, u, k, v, aa, bb, pp):
    """RWKV-4 over T tokens: w, u [C]; k, v [T, C]; state aa, bb, pp [C]. -> (y [T, C], aa, bb, pp)."""
    lib = _lib(k)
    if lib is None:
        return None
    k, v, w, u = (_f32(t) for t in (k, v, w, u))
    aa, bb, pp = (t.float().clone().contiguous() for t in (aa, bb, pp))
    T, C = k.shape
    y = torch.empty_like(k)
    lib.rwkv_wkv4(w.data_ptr(), u.data_ptr(), k.data_ptr(), v.data_ptr(), aa.data_ptr(), bb.data_ptr(),
                  pp.data_ptr(), y.data_ptr(), T, C, _threads(C // 64 or 1))
    return y, aa, bb, pp


def wkv5(r, k, v, w, u, s):
    """RWKV-5.x/6 over T tokens, bonus included: r, k, v [T, H, N]; w [H, N|1, 1] (fixed) or [T, H, N, 1]
    (per token); u [H, N|1, 1]; s [H, N_key, N_value]. -> (y [T, H, N], s)."""
    lib = _lib(r)
    if lib is None:
        return None
    T, H, N = r.shape
    per_token = w.dim() == 4
    w = w.squeeze(-1).expand(T, H, N) if per_token else w.expand(H, N, 1).reshape(H, N)
    r, k, v, w = (_f32(t) for t in (r, k, v, w))
    u = _f32(u.expand(H, N, 1).reshape(H, N))
    s = s.float().clone().contiguous()
    y = torch.empty_like(r)
    lib.rwkv_wkv5(r.data_ptr(), k.data_ptr(), v.data_ptr(), w.data_ptr(), u.data_ptr(), s.data_ptr(), y.data_ptr(),
                  T, H, N, int(per_token), _threads(H))
    return y, s


def wkv7(r, w, k, v, kk, a, s):
    """RWKV-7 over T tokens: r, w, k, v, kk, a [T, H, N]; s [H, N_value, N_key]. -> (y [T, H, N], s)."""
    lib = _lib(r)
    if lib is None or r.shape[-1] > MAX_HEAD_SIZE:
        return None
    T, H, N = r.shape
    r, w, k, v, kk, a = (_f32(t) for t in (r, w, k, v, kk, a))
    s = s.float().clone().contiguous()
    y = torch.empty_like(r)
    lib.rwkv_wkv7(r.data_ptr(), w.data_ptr(), k.data_ptr(), v.data_ptr(), kk.data_ptr(), a.data_ptr(), s.data_ptr(),
                  y.data_ptr(), T, H, N, _threads(H))
    return y, s
