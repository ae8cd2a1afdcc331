"""Weight schemes: how a large matrix is stored and multiplied. The runner never branches on a scheme's
name; it calls `scheme.quantize(weight)` once at load and `weight.matmul(x)` at run time.

Matrices arrive in the checkpoint's nn.Linear layout [out, in]; `matmul(x)` computes x @ W.T."""

from __future__ import annotations

from typing import Protocol

import torch

from .float_weights import FloatScheme, FloatWeight, held_float_for_cpu, held_lora_for_cpu
from .rwkv_int8 import RwkvInt8Rows, RwkvInt8Scheme, RwkvInt8Weight


class Weight(Protocol):
    def matmul(self, x: torch.Tensor) -> torch.Tensor: ...
    def dequantize(self) -> torch.Tensor: ...  # [out, in], fp32
    def to(self, device) -> Weight: ...
    @property
    def nbytes(self) -> int: ...


class WeightScheme(Protocol):
    name: str

    def quantize(self, weight: torch.Tensor, atype: torch.dtype) -> Weight: ...


_FLOAT = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def scheme_for(name: str) -> WeightScheme:
    """'fp32' | 'fp16' | 'bf16' | 'i8' (the rwkv pip package's int8)."""
    if name == "i8":
        return RwkvInt8Scheme()
    return FloatScheme(_FLOAT[name])


def held_for_cpu(weight):
    """How the runner holds a weight it computes with on the CPU (a faster form where one loses nothing: bf16
    rows, int8 rows), or the weight itself. Writers of files never see these forms."""
    if isinstance(weight, RwkvInt8Weight):
        return RwkvInt8Rows.held(weight)
    return held_float_for_cpu(weight)


__all__ = ["FloatScheme", "FloatWeight", "RwkvInt8Rows", "RwkvInt8Scheme", "RwkvInt8Weight", "Weight", "WeightScheme",
           "held_for_cpu", "held_lora_for_cpu", "scheme_for"]
