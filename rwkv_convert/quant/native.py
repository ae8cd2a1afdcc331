"""The CPU int8 kernel (int8_cpu.c), built and cached by rwkv_convert.cpu.build on first use. Without a
compiler, or if the build fails, callers fall back to torch (one line on stderr, once)."""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from ..cpu.build import library

_SOURCE = Path(__file__).with_name("int8_cpu.c")


def _declare(lib: ctypes.CDLL) -> None:
    lib.rwkv_int8_gemv.restype = None
    lib.rwkv_int8_gemv.argtypes = [ctypes.c_void_p] * 7 + [ctypes.c_int64, ctypes.c_int64, ctypes.c_int]


def int8_library():
    """The loaded kernel library, or None when it cannot be built (RWKV_CONVERT_NO_NATIVE=1 forces None)."""
    return library(_SOURCE, _declare, "int8 kernel")


def int8_gemv(x: torch.Tensor, q: torch.Tensor, mx: torch.Tensor, rx: torch.Tensor, my: torch.Tensor,
              ry: torch.Tensor) -> torch.Tensor:
    """x: fp32 [N] contiguous; q: uint8 [N, M]; companions fp32 contiguous. Returns fp32 [M]."""
    lib = int8_library()
    N, M = q.shape
    y = torch.empty(M, dtype=torch.float32)
    lib.rwkv_int8_gemv(x.data_ptr(), q.data_ptr(), mx.data_ptr(), rx.data_ptr(), my.data_ptr(), ry.data_ptr(),
                       y.data_ptr(), N, M, torch.get_num_threads())
    return y
