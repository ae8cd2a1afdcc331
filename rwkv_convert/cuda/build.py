"""Building rwkv_kernels.cu for the GPU in use: on first use, with torch's cpp_extension, cached under the
rwkv-convert cache directory by source hash, card architecture and torch version. Any failure (no nvcc, a
compiler error, a torch without CUDA) prints one line and leaves the torch fallbacks in charge."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import torch

from ..paths import kernels_dir

SOURCE = Path(__file__).with_name("rwkv_kernels.cu")
_cache: dict[str, object] = {}


def compile_flags(major: int, minor: int) -> list[str]:
    arch = f"{major}{minor}"
    # sm_90a would allow Hopper-only instructions; these kernels use none, so plain sm_XY keeps one binary per card
    # no -std here: cpp_extension passes its own (a second one makes nvcc stop)
    return ["-O3", "--use_fast_math", f"-gencode=arch=compute_{arch},code=sm_{arch}", "-diag-suppress=3306"]


def build_extension(capability: tuple[int, int] | None = None):
    """Compile and load the kernels (no caching in this process: see extension()). Returns the module or
    None, after one line on stderr saying why."""
    try:
        from torch.utils.cpp_extension import load

        major, minor = capability or torch.cuda.get_device_capability()
        digest = hashlib.sha256(SOURCE.read_bytes() + f"{major}{minor}{torch.__version__}".encode()).hexdigest()[:12]
        name = f"rwkv_convert_kernels_{digest}"
        build_dir = kernels_dir() / name
        build_dir.mkdir(parents=True, exist_ok=True)
        return load(name=name, sources=[str(SOURCE)], extra_cuda_cflags=compile_flags(major, minor),
                    extra_cflags=["-O3"], build_directory=str(build_dir), verbose=False)
    except Exception as e:  # ImportError, OSError (no CUDA_HOME/nvcc), RuntimeError (compiler), ...
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        print(f"rwkv-convert: CUDA kernels unavailable ({type(e).__name__}: {reason}); using the torch fallback",
              file=sys.stderr)
        return None


def extension():
    """The kernels module, built once per process; None without a GPU, when RWKV_CONVERT_NO_CUDA_KERNELS=1,
    or when the build failed."""
    if "module" not in _cache:
        wanted = torch.cuda.is_available() and os.environ.get("RWKV_CONVERT_NO_CUDA_KERNELS") != "1"
        _cache["module"] = build_extension() if wanted else None
    return _cache["module"]
