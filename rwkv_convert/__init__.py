"""rwkv-convert: load, run, quantize, export and verify RWKV (v4, v5.x, v6, v7) checkpoints."""

from __future__ import annotations

from .checkpoint import Checkpoint
from .errors import RwkvConvertError, UnsupportedError
from .formats.registry import convert, load, read_checkpoint
from .runner import Model
from .spec import ModelSpec

__version__ = "0.1.0"

__all__ = ["Checkpoint", "Model", "ModelSpec", "RwkvConvertError", "UnsupportedError", "convert", "load",
           "read_checkpoint"]
