"""Building rwkv_kernels.cu for the GPU in use: on first use, with torch's cpp_extension, cached under the
rwkv-convert cache directory by source hash, card architecture and torch version. Any failure (no nvcc, a
compiler error, a torch without CUDA) prints one line and leaves the torch fallbacks in charge. Built or loaded,
the kernels then prove themselves on the card (selftest.py) before the runner uses them."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import torch

from ..paths import kernels_dir
from .selftest import trusted, verdict_name

SOURCE = Path(__file__).with_name("rwkv_kernels.cu")
KERNELS_HEADER = SOURCE.with_name("rwkv_kernels.cuh")  # the kernels themselves; the .cu wraps them for torch
_cache: dict[str, object] = {}


def compile_flags(major: int, minor: int) -> list[str]:
    arch = f"{major}{minor}"
    # sm_90a would allow Hopper-only instructions; these kernels use none, so plain sm_XY keeps one binary per card
    # no -std here: cpp_extension passes its own (a second one makes nvcc stop)
    return ["-O3", "--use_fast_math", f"-gencode=arch=compute_{arch},code=sm_{arch}", "-diag-suppress=3306"]


def build_directory(capability: tuple[int, int]) -> Path:
    """Where the build for this architecture (and this source and torch) lives, its self-test verdicts too."""
    major, minor = capability
    sources = SOURCE.read_bytes() + KERNELS_HEADER.read_bytes()
    digest = hashlib.sha256(sources + f"{major}{minor}{torch.__version__}".encode()).hexdigest()[:12]
    return kernels_dir() / f"rwkv_convert_kernels_{digest}"


def build_extension(capability: tuple[int, int] | None = None):
    """Compile and load the kernels (no caching in this process: see extension()). Returns the module or
    None, after one line on stderr saying why."""
    try:
        from torch.utils.cpp_extension import load

        major, minor = capability or torch.cuda.get_device_capability()
        build_dir = build_directory((major, minor))
        build_dir.mkdir(parents=True, exist_ok=True)
        return load(name=build_dir.name, sources=[str(SOURCE)], extra_cuda_cflags=compile_flags(major, minor),
                    extra_cflags=["-O3"], extra_include_paths=[str(SOURCE.parent)],
                    build_directory=str(build_dir), verbose=False)
    except Exception as e:  # ImportError, OSError (no CUDA_HOME/nvcc), RuntimeError (compiler), ...
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        print(f"rwkv-convert: CUDA kernels unavailable ({type(e).__name__}: {reason}); using the torch fallback",
              file=sys.stderr)
        return None


def extension():
    """The kernels module, built once per process and self-tested on the card in use; None without a GPU, when
    RWKV_CONVERT_NO_CUDA_KERNELS=1, when the build failed, or when the self-test failed (one line each)."""
    if "module" not in _cache:
        wanted = torch.cuda.is_available() and os.environ.get("RWKV_CONVERT_NO_CUDA_KERNELS") != "1"
        module = build_extension() if wanted else None
        if module is not None:
            card = torch.cuda.get_device_name()
            verdict = build_directory(torch.cuda.get_device_capability()) / verdict_name(card)
            ok, _cache["self_test"] = trusted(module, "cuda", card, verdict)
            module = module if ok else None
        _cache["module"] = module
    return _cache["module"]


def self_test_report() -> list | None:
    """The GPU kernels' self-test checks (selftest.KernelCheck) of this process, None before extension() ran
    them (no GPU, no build)."""
    return _cache.get("self_test")
