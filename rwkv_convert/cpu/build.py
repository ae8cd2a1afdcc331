"""Compiling a C source of rwkv-convert into a shared library on first use, cached by source hash and CPU
(flags and machine), and loading it with ctypes. Any failure prints one line, once, and the caller falls back
to torch; RWKV_CONVERT_NO_KERNELS=1 turns every kernel off."""

from __future__ import annotations

import ctypes
import os
import platform
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from ..kernel_build import build_library, kernels_turned_off

_loaded: dict[Path, ctypes.CDLL | None] = {}


def _build(source: Path) -> ctypes.CDLL:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise RuntimeError("no C compiler (cc/gcc) found")
    flags = ["-O3", "-shared", "-fPIC", "-fopenmp"]
    if platform.machine() in ("x86_64", "AMD64", "aarch64", "arm64"):
        flags.append("-march=native")
    return ctypes.CDLL(str(build_library(source, compiler, flags, libraries=("-lm",))))


def library(source: Path, declare: Callable[[ctypes.CDLL], None], what: str) -> ctypes.CDLL | None:
    """The library built from `source` (declare sets its functions' argtypes), or None when it cannot be
    built or RWKV_CONVERT_NO_KERNELS=1; `what` names it in the one line printed on failure."""
    if source not in _loaded:
        lib = None
        if kernels_turned_off() is None:
            try:
                lib = _build(source)
                declare(lib)
            except Exception as e:  # any failure: fall back to torch, say so once
                print(f"rwkv-convert: the {what} is unavailable ({e}); using the slower torch path", file=sys.stderr)
                lib = None
        _loaded[source] = lib
    return _loaded[source]
