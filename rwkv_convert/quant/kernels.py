"""The CPU kernels for weights (int8_cpu.c; rows_cpu.c for the runner's row-major bf16 and int8 forms), built
and cached by rwkv_convert.cpu.build on first use.
Without a compiler, or if the build fails, callers fall back to torch (one line on stderr, once)."""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from ..cpu.build import library

_INT8_SOURCE = Path(__file__).with_name("int8_cpu.c")
_ROWS_SOURCE = Path(__file__).with_name("rows_cpu.c")


def _declare_int8(lib: ctypes.CDLL) -> None:
    lib.rwkv_int8_gemv.restype = None
    lib.rwkv_int8_gemv.argtypes = [ctypes.c_void_p] * 7 + [ctypes.c_int64, ctypes.c_int64, ctypes.c_int]


def _declare_rows(lib: ctypes.CDLL) -> None:
    lib.rwkv_bf16_matmul.restype = None
    lib.rwkv_bf16_matmul.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3 + [ctypes.c_int]
    lib.rwkv_int8_rows.restype = ctypes.c_int
    lib.rwkv_int8_rows.argtypes = [ctypes.c_void_p] * 7 + [ctypes.c_int64] * 3 + [ctypes.c_int]


def int8_library():
    """The loaded kernel library, or None when it cannot be built (RWKV_CONVERT_NO_KERNELS=1 forces None)."""
    return library(_INT8_SOURCE, _declare_int8, "int8 kernel")


def rows_library():
    """The row-major bf16/int8 kernel library, or None (as int8_library)."""
    return library(_ROWS_SOURCE, _declare_rows, "row-major matmul kernel")


def int8_gemv(x: torch.Tensor, q: torch.Tensor, mx: torch.Tensor, rx: torch.Tensor, my: torch.Tensor,
              ry: torch.Tensor) -> torch.Tensor:
    """x: fp32 [N] contiguous; q: uint8 [N, M]; companions fp32 contiguous. Returns fp32 [M]."""
    lib = int8_library()
    N, M = q.shape
    y = torch.empty(M, dtype=torch.float32)
    lib.rwkv_int8_gemv(x.data_ptr(), q.data_ptr(), mx.data_ptr(), rx.data_ptr(), my.data_ptr(), ry.data_ptr(),
                       y.data_ptr(), N, M, torch.get_num_threads())
    return y


def bf16_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x: [T, N] (any float dtype); w: bf16 [M, N] contiguous on the CPU. Returns fp32 [T, M] = x @ w.T with
    fp32 products and sums. Call only when rows_library() is not None."""
    x = x.float().contiguous()
    T, N = x.shape
    M = w.shape[0]
    y = torch.empty((T, M), dtype=torch.float32)
    rows_library().rwkv_bf16_matmul(x.data_ptr(), w.data_ptr(), y.data_ptr(), T, N, M, torch.get_num_threads())
    return y


def int8_rows(x: torch.Tensor, q_rows: torch.Tensor, mx: torch.Tensor, rx: torch.Tensor, my: torch.Tensor,
              ry: torch.Tensor) -> torch.Tensor:
    """x: [T, N]; q_rows: uint8 [M, N] contiguous (the package's q transposed); companions fp32 contiguous,
    mx, rx [M] and my, ry [N]. Returns fp32 [T, M]. Call only when rows_library() is not None."""
    x = x.float().contiguous()
    T, N = x.shape
    M = q_rows.shape[0]
    y = torch.empty((T, M), dtype=torch.float32)
    if rows_library().rwkv_int8_rows(x.data_ptr(), q_rows.data_ptr(), mx.data_ptr(), rx.data_ptr(), my.data_ptr(),
                                     ry.data_ptr(), y.data_ptr(), T, N, M, torch.get_num_threads()):
        raise MemoryError(f"int8 kernel: no memory for {T}x{N} floats of scratch")
    return y
