"""Weight schemes: how a large matrix is stored and multiplied. The runner never branches on a scheme's
name; it calls `scheme.quantize(weight)` once at load and `weight.matmul(x)` at run time.

Matrices arrive in the checkpoint's nn.Linear layout [out, in]; `matmul(x)` computes x @ W.T."""

from __future__ import annotations

from typing import Protocol

import torch

from .float_weights import FloatScheme, FloatWeight
from .rwkv_int8 import RwkvInt8Scheme, RwkvInt8Weight


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


__all__ = ["FloatScheme", "FloatWeight", "RwkvInt8Scheme", "RwkvInt8Weight", "Weight", "WeightScheme",
           "scheme_for"]
