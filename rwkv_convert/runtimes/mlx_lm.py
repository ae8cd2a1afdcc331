"""Running MLX directories in mlx-lm (Apple's MLX; on Linux `mlx[cpu]`): the model as `mlx_lm.load` builds it
(its models/rwkv7.py, quantized layers as its loader makes them), fed chunk by chunk with its cache carrying the
state. Only the model is loaded: the tokenizer's code is never run here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..client_files import client_view
from ..errors import RwkvConvertError, brief
from .base import Client

PIN = 'mlx-lm==0.32.2 "mlx[cpu]==0.32.4"'
CLIENT = Client("mlx-lm", "mlx-lm", "mlx_lm", "runs --to mlx directories in MLX (verify, quality)",
                f"pip install {PIN}  (on a Mac: mlx-lm alone)")
MODEL_FILES = ("config.json", "model.safetensors")  # what mlx-lm's load_model reads of the directory


class MlxSession:
    """An MLX directory opened in mlx-lm: a runtimes.base.Session."""

    def __init__(self, directory: Path):
        CLIENT.imported("running MLX directories", "or verify with --runner ours")
        import mlx.core as mx
        from mlx_lm.utils import load_model

        self.mx = mx
        directory = Path(directory)
        # mlx-lm gets our checked files under our names in a folder of ours (client_files), nothing else of the
        # directory: its config bytes as read, its weights as the open file
        copies = {"model/config.json": (directory / "config.json").read_bytes()}
        try:
            with client_view({"model/model.safetensors": directory / "model.safetensors"}, copies) as view:
                self.model, _ = load_model(Path(view.path("model")))
                mx.eval(self.model.parameters())  # read now, while the view exists
        except Exception as e:  # mlx-lm raises many kinds on a directory it cannot build a model from
            raise RwkvConvertError(f"mlx-lm could not load {directory}: {brief(e)}") from None

    def logits(self, chunks: list[list[int]]) -> torch.Tensor:
        mx = self.mx
        cache = self.model.make_cache()
        rows = []
        for chunk in chunks:
            out = self.model(mx.array([chunk]), cache=cache)
            rows.append(np.array(out[0].astype(mx.float32)))
        return torch.from_numpy(np.concatenate(rows))
