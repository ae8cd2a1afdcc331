"""The tensors a GGUF file of ours holds, in order, and how each is made from our tensors (gguf_tables' rows):
what the writer (gguf_file.py), the size planner (gguf_size.py) and the importance matrix (gguf_imatrix.py)
walk."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..checkpoint import Checkpoint
from ..spec import ModelSpec
from .gguf_tables import GLOBAL, WRITE_TABLES, Row


@dataclass
class TensorJob:
    name: str
    shape: tuple[int, ...]  # numpy order
    quantizable: bool  # a large matrix: takes --quant (or the strategy's choice); else F32
    make: Callable[[], torch.Tensor]
    layer: int  # the strategy slot that decides its type (n_layer for globals)
    source: str | None = None  # our key, where the file's rows are that tensor's rows (calibration applies)
    lora: bool = False  # a LoRA factor: F32 unless --target-size plans it (gguf_tables.Row.lora)
    factor: str | None = None  # a LoRA's our key, where the file holds that factor (transposed) on its own layer
    layout: str = "copy"

    def as_ours(self, t: torch.Tensor) -> torch.Tensor:
        """The file's tensor in our key's layout (for a `factor`)."""
        return t.t() if self.layout == "t" else t.permute(0, 2, 1) if self.layout == "swap12" else t


def _source(row: Row, tensors: dict, spec: ModelSpec, i: int) -> torch.Tensor:
    """The row's tensor, made from our tensors as the file holds it."""
    keys = row.layer0 if i == 0 and row.layer0 else row.ours
    sources = [tensors[k.format(i=i)] for k in keys]
    shape = row.shape(spec, i)
    if row.make is not None:
        t = row.make(sources, shape)
    elif len(sources) > 1:
        t = torch.stack([s.reshape(shape[1:]) for s in sources])
    else:
        t = sources[0]
    if row.layout == "t":
        t = t.t()
    elif row.layout == "swap12":
        t = t.permute(0, 2, 1)
    # llama.cpp's 1-D vectors ([1, 1, C] mixes, [H, N] r_k); any other shape must already match (_encode checks)
    return t.reshape(-1) if len(shape) == 1 else t


def tensor_jobs(ckpt: Checkpoint) -> list[TensorJob]:
    """Every tensor of the file, in order: the globals, then each layer's rows."""
    spec, T = ckpt.spec, ckpt.tensors
    slots = {"first": 0, "head": spec.n_layer}
    jobs = [TensorJob(row.gguf, row.shape(spec, 0), row.quantizable, lambda row=row: _source(row, T, spec, 0),
                      slots[row.slot], _same_rows(row, 0)) for row in GLOBAL]
    for i in range(spec.n_layer):
        jobs += [TensorJob(row.gguf.format(i=i), row.shape(spec, i), row.quantizable,
                           lambda row=row, i=i: _source(row, T, spec, i), i, _same_rows(row, i), row.lora,
                           _factor(row, i), row.layout)
                 for row in WRITE_TABLES[spec.version]]
    return jobs


def _factor(row: Row, i: int) -> str | None:
    """A LoRA row's our key, where the file holds that one factor of this layer (not a copy from another)."""
    if not row.lora or len(row.ours) != 1 or row.make is not None or (i == 0 and row.layer0):
        return None
    return row.ours[0].format(i=i)


def _same_rows(row: Row, i: int) -> str | None:
    """Our key whose [out, in] rows the file's rows are (one source, copied as it is), else None."""
    keys = row.layer0 if i == 0 and row.layer0 else row.ours
    if len(keys) != 1 or row.make is not None or row.layout != "copy":
        return None
    return keys[0].format(i=i)
