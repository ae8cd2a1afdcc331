"""The CPU int8 kernel (int8_cpu.c): compiled with the system C compiler on first use and cached.
Without a compiler, or if the build fails, callers fall back to torch (one line on stderr, once)."""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from ..atomic import AtomicOutput
from ..paths import kernels_dir

_SOURCE = Path(__file__).with_name("int8_cpu.c")
_lib = None
_tried = False


def _cpu_signature() -> str:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor()
    return hashlib.sha256(flags.encode()).hexdigest()[:12]


def _build() -> ctypes.CDLL:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise RuntimeError("no C compiler (cc/gcc) found")
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(source + _cpu_signature().encode() + platform.machine().encode()).hexdigest()[:16]
    folder = kernels_dir()
    folder.mkdir(parents=True, exist_ok=True)
    lib_path = folder / f"int8_cpu-{key}.so"
    if not lib_path.exists():
        flags = ["-O3", "-shared", "-fPIC", "-fopenmp"]
        if platform.machine() in ("x86_64", "AMD64", "aarch64", "arm64"):
            flags.append("-march=native")
        with AtomicOutput(lib_path) as out:  # another process may build the same library at the same time
            proc = subprocess.run([compiler, *flags, str(_SOURCE), "-o", str(out.temp())], capture_output=True,
                                  text=True)
            if proc.returncode:
                raise RuntimeError(f"{compiler} failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr else ''}")
    lib = ctypes.CDLL(str(lib_path))
    lib.rwkv_int8_gemv.restype = None
    lib.rwkv_int8_gemv.argtypes = [ctypes.c_void_p] * 7 + [ctypes.c_int64, ctypes.c_int64, ctypes.c_int]
    return lib


def int8_library():
    """The loaded kernel library, or None when it cannot be built (RWKV_CONVERT_NO_NATIVE=1 forces None)."""
    global _lib, _tried
    if not _tried:
        _tried = True
        if os.environ.get("RWKV_CONVERT_NO_NATIVE") == "1":
            return None
        try:
            _lib = _build()
        except Exception as e:  # any failure: fall back to torch, say so once
            print(f"rwkv-convert: native int8 kernel unavailable ({e}); using the slower torch path",
                  file=sys.stderr)
            _lib = None
    return _lib


def int8_gemv(x: torch.Tensor, q: torch.Tensor, mx: torch.Tensor, rx: torch.Tensor, my: torch.Tensor,
              ry: torch.Tensor) -> torch.Tensor:
    """x: fp32 [N] contiguous; q: uint8 [N, M]; companions fp32 contiguous. Returns fp32 [M]."""
    lib = int8_library()
    N, M = q.shape
    y = torch.empty(M, dtype=torch.float32)
    lib.rwkv_int8_gemv(x.data_ptr(), q.data_ptr(), mx.data_ptr(), rx.data_ptr(), my.data_ptr(), ry.data_ptr(),
                       y.data_ptr(), N, M, torch.get_num_threads())
    return y
