"""rwkv-convert: load, run, quantize, export and verify RWKV (v4, v5.x, v6, v7) checkpoints."""

from __future__ import annotations

import os

from .checkpoint import Checkpoint, read_checkpoint
from .errors import RwkvConvertError, UnsupportedError
from .runner import Model
from .spec import ModelSpec

__version__ = "0.1.0"


def load(path: str | os.PathLike, strategy: str = "cpu fp32") -> Model:
    """Read a checkpoint and prepare it to run with the given strategy string."""
    return Model(read_checkpoint(path), strategy)


__all__ = ["Checkpoint", "Model", "ModelSpec", "RwkvConvertError", "UnsupportedError", "load", "read_checkpoint"]
