"""Where rwkv-convert keeps what it makes on demand: built kernels and test fixtures."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """$RWKV_CONVERT_CACHE, else ~/.cache/rwkv-convert."""
    return Path(os.environ.get("RWKV_CONVERT_CACHE") or Path.home() / ".cache" / "rwkv-convert")


def kernels_dir() -> Path:
    """Compiled CPU and CUDA kernels (keyed by source hash and machine, so stale builds are never used)."""
    return cache_root() / "kernels"
