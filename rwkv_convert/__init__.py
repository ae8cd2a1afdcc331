"""rwkv-convert: load, run, quantize, export and verify RWKV (v4, v5.x, v6, v7) checkpoints."""

from __future__ import annotations

import os

from .checkpoint import Checkpoint
from .errors import RwkvConvertError, UnsupportedError
from .formats.registry import convert, load, read_checkpoint
from .runner import Model
from .spec import ModelSpec

__version__ = "0.1.0"

# MKL otherwise runs a matmul on fewer threads when the machine is busy, and another split of its sums changes the
# last bits: a verdict's figures must not depend on the load (read at MKL's first call; child processes inherit it)
os.environ.setdefault("MKL_DYNAMIC", "FALSE")

__all__ = ["Checkpoint", "Model", "ModelSpec", "RwkvConvertError", "UnsupportedError", "convert", "load",
           "read_checkpoint"]
