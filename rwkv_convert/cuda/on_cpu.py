"""The CUDA kernels compiled for the CPU: kernels_on_cpu.cpp, which includes rwkv_kernels.cuh (the kernels the
GPU runs, as written) with cuda_on_cpu.h in place of CUDA. Each block's threads run as real threads that take
turns between barriers in a seeded order, so an indexing, bounds, shared-memory or synchronisation mistake shows
as wrong numbers, a named bad barrier, or a one-line timeout (docs/cuda.md says what this proves and what only a
GPU can). KernelsOnCpu has the GPU extension's functions on CPU tensors (the stream is ignored), so ops.py and
the self-test run either. Used by the tests and by `Model(kernels="cuda-on-cpu")`."""

from __future__ import annotations

import ctypes
import os
import shutil
import sys
from pathlib import Path

import torch

from ..kernel_build import build_library
from .selftest import trusted, verdict_name

HERE = Path(__file__).parent
SOURCE_NAME, HEADER_NAMES = "kernels_on_cpu.cpp", ("rwkv_kernels.cuh", "cuda_on_cpu.h")
# -O1: the tests build this (and broken copies of it) often; no fast math, unlike the GPU build
FLAGS = ["-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-fvisibility=hidden", "-fvisibility-inlines-hidden",
         "-fno-gnu-unique", "-Wno-unknown-pragmas"]
NO_KERNEL = 2  # an entry's return code for a head size without a kernel
CARD = "the CPU build of the CUDA kernels"


class KernelFault(RuntimeError):
    """A launch the CPU build stopped: a barrier not every thread of a block reaches."""


def build(source_dir: Path = HERE) -> KernelsOnCpu:
    """Compile (cached by the sources' hash) and load kernels_on_cpu.cpp from source_dir. RuntimeError when no
    C++ compiler is found or it fails."""
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not compiler:
        raise RuntimeError("no C++ compiler (c++/g++) found")
    source = source_dir / SOURCE_NAME
    path = build_library(source, compiler, FLAGS, depends=tuple(source_dir / name for name in HEADER_NAMES))
    return KernelsOnCpu(path)


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def _check(name: str, t: torch.Tensor, dtype: torch.dtype = torch.float32) -> None:
    # what the CUDA build's CHECK_CUDA_F32 says, for CPU tensors
    if t.device.type != "cpu" or not t.is_contiguous() or t.dtype != dtype:
        raise ValueError(f"{name} must be a contiguous {dtype} CPU tensor")


class KernelsOnCpu:
    """The extension's functions (rwkv_kernels.cu's PYBIND11_MODULE) on CPU tensors: same arguments, same in-place
    state updates, same results."""

    def __init__(self, path: Path):
        self.path = path
        lib = ctypes.CDLL(str(path))
        p, i = ctypes.c_void_p, ctypes.c_int
        lib.rwkv_kernel_error.restype = ctypes.c_char_p
        lib.rwkv_set_schedule_seed.argtypes = [ctypes.c_uint64]
        lib.rwkv_wkv4.argtypes = [i, i] + [p] * 8
        lib.rwkv_wkv5.argtypes = [i, i, i] + [p] * 4 + [i] + [p] * 3
        lib.rwkv_wkv7.argtypes = [i, i, i] + [p] * 8
        lib.rwkv_wkv7_chunked.argtypes = [i, i, i] + [p] * 8
        lib.rwkv_int8_gemv.argtypes = [i, i] + [p] * 7
        lib.rwkv_int8_dequant.argtypes = [i, i] + [p] * 6
        self._lib = lib

    def set_schedule_seed(self, seed: int) -> None:
        """The order in which a block's threads take turns derives from this seed (and the launch count)."""
        self._lib.rwkv_set_schedule_seed(seed)

    def _done(self, code: int, what: str) -> None:
        if code == NO_KERNEL:
            raise ValueError(f"{what}: this head size has no kernel (16, 32, 64, 128)")
        if code:
            raise KernelFault(self._lib.rwkv_kernel_error().decode())

    def wkv4(self, w, u, k, v, aa, bb, pp, stream: int = 0) -> torch.Tensor:
        for name, t in zip("w u k v aa bb pp".split(), (w, u, k, v, aa, bb, pp), strict=True):
            _check(name, t)
        y = torch.empty_like(k)
        self._done(self._lib.rwkv_wkv4(k.shape[0], k.shape[1], *map(_ptr, (w, u, k, v, y, aa, bb, pp))), "wkv4")
        return y

    def wkv5(self, r, k, v, w, u, s, stream: int = 0) -> torch.Tensor:
        for name, t in zip("r k v w u s".split(), (r, k, v, w, u, s), strict=True):
            _check(name, t)
        T, H, N = r.shape
        y = torch.empty_like(r)
        code = self._lib.rwkv_wkv5(T, H, N, *map(_ptr, (r, k, v, w)), int(w.dim() == 3), *map(_ptr, (u, s, y)))
        self._done(code, "wkv5")
        return y

    def wkv7(self, r, w, k, v, kk, a, s, stream: int = 0) -> torch.Tensor:
        return self._wkv7("wkv7", r, w, k, v, kk, a, s)

    def wkv7_chunked(self, r, w, k, v, kk, a, s, stream: int = 0) -> torch.Tensor:
        return self._wkv7("wkv7_chunked", r, w, k, v, kk, a, s)

    def _wkv7(self, kernel: str, r, w, k, v, kk, a, s) -> torch.Tensor:
        """Either RWKV-7 entry (token by token, or in chunks): the same arguments, the same results."""
        for name, t in zip("r w k v kk a s".split(), (r, w, k, v, kk, a, s), strict=True):
            _check(name, t)
        T, H, N = r.shape
        y = torch.empty_like(r)
        self._done(getattr(self._lib, f"rwkv_{kernel}")(T, H, N, *map(_ptr, (r, w, k, v, kk, a, s, y))), kernel)
        return y

    def int8_gemv(self, x, q, mx, rx, my, ry, stream: int = 0) -> torch.Tensor:
        for name, t in zip("x mx rx my ry".split(), (x, mx, rx, my, ry), strict=True):
            _check(name, t)
        _check("q", q, torch.uint8)
        if q.shape[1] % 4:
            raise ValueError("int8_gemv: the output width must be a multiple of 4")
        y = torch.empty(q.shape[1], dtype=torch.float32)
        self._done(self._lib.rwkv_int8_gemv(q.shape[0], q.shape[1], *map(_ptr, (x, q, mx, rx, my, ry, y))),
                   "int8_gemv")
        return y

    def int8_dequant(self, q, mx, rx, my, ry, dtype: torch.dtype, stream: int = 0) -> torch.Tensor:
        for name, t in zip("mx rx my ry".split(), (mx, rx, my, ry), strict=True):
            _check(name, t)
        _check("q", q, torch.uint8)
        out = torch.empty(q.shape, dtype=torch.float32)
        self._done(self._lib.rwkv_int8_dequant(q.shape[0], q.shape[1], *map(_ptr, (q, mx, rx, my, ry, out))),
                   "int8_dequant")
        return out.to(dtype)  # the GPU build converts each fp32 value the same way (round to nearest)


_trusted: dict[str, KernelsOnCpu | None] = {}


def trusted_kernels() -> KernelsOnCpu | None:
    """The CPU build when it builds and passes its self-test (cached beside the library), else None after one
    line on stderr. Once per process."""
    card = CARD  # read here: a test that alters the kernels names another card, so no honest verdict covers it
    if card not in _trusted:
        try:
            ext = build()
        except Exception as e:  # no compiler, a compiler error: say so once, the torch path runs
            print(f"rwkv-convert: {CARD} unavailable ({e}); using the torch path", file=sys.stderr)
            ext = None
        if ext is not None:
            ok, _ = trusted(ext, "cpu", card, ext.path.with_name(f"{ext.path.stem}.{verdict_name(card)}"))
            ext = ext if ok else None
        _trusted[card] = ext
    return _trusted[card]
