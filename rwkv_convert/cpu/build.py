"""Compiling a C source of rwkv-convert into a shared library on first use, cached by source hash and CPU
(flags and machine), and loading it with ctypes. Any failure prints one line, once, and the caller falls back
to torch; RWKV_CONVERT_NO_NATIVE=1 turns every native kernel off."""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from ..atomic import AtomicOutput
from ..paths import kernels_dir

_loaded: dict[Path, ctypes.CDLL | None] = {}


def _cpu_signature() -> str:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor()
    return hashlib.sha256(flags.encode()).hexdigest()[:12]


def _build(source: Path) -> ctypes.CDLL:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise RuntimeError("no C compiler (cc/gcc) found")
    key = hashlib.sha256(source.read_bytes() + _cpu_signature().encode() + platform.machine().encode()).hexdigest()
    folder = kernels_dir()
    folder.mkdir(parents=True, exist_ok=True)
    lib_path = folder / f"{source.stem}-{key[:16]}.so"
    if not lib_path.exists():
        flags = ["-O3", "-shared", "-fPIC", "-fopenmp"]
        if platform.machine() in ("x86_64", "AMD64", "aarch64", "arm64"):
            flags.append("-march=native")
        with AtomicOutput(lib_path) as out:  # another process may build the same library at the same time
            proc = subprocess.run([compiler, *flags, str(source), "-lm", "-o", str(out.temp())], capture_output=True,
                                  text=True)
            if proc.returncode:
                raise RuntimeError(f"{compiler} failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr else ''}")
    return ctypes.CDLL(str(lib_path))


def library(source: Path, declare: Callable[[ctypes.CDLL], None], what: str) -> ctypes.CDLL | None:
    """The library built from `source` (declare sets its functions' argtypes), or None when it cannot be
    built or RWKV_CONVERT_NO_NATIVE=1; `what` names it in the one line printed on failure."""
    if source not in _loaded:
        lib = None
        if os.environ.get("RWKV_CONVERT_NO_NATIVE") != "1":
            try:
                lib = _build(source)
                declare(lib)
            except Exception as e:  # any failure: fall back to torch, say so once
                print(f"rwkv-convert: native {what} unavailable ({e}); using the slower torch path", file=sys.stderr)
                lib = None
        _loaded[source] = lib
    return _loaded[source]
