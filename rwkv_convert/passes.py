"""Load-time passes: pure functions from named tensors (or prepared weights) to new ones. Each leaves its
input untouched; the runner records which ran (Model.passes) and `plan` lists them.

- fold_ln0:            emb = LayerNorm(emb; ln0), in fp32, and ln0 removed
- rescale_for_fp16:    att.output / ffn.value of block i divided by 2^(i // every) (exact: powers of two)
- precompute_decay:    the version's decay and bonus transforms (v4 -exp(w); v5 exp(-exp(w)); bonus u)
- stack_projections:   the attention's input projections of a float layer in one [n, in, out] tensor
(The column-major layout of one-token matrices is part of FloatScheme, see quant/float_weights.py.)"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .arch.common import PROJECTIONS_KEY, layer_norm
from .quant.float_weights import FloatWeight, StackedFloatWeight

FOLD_LN0 = "fold-ln0-fp32"
RESCALE = "fp16-rescale"
DECAY = "precompute-decay"
STACK = "stack-projections"
ALL_PASSES = (FOLD_LN0, RESCALE, DECAY, STACK)


def fold_ln0(tensors: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """In fp32 (ours); the pip package folds in the file's or the strategy's dtype (Model's ln0_fold)."""
    out = {k: v for k, v in tensors.items() if not k.startswith("blocks.0.ln0.")}
    out["emb.weight"] = layer_norm(tensors["emb.weight"].to(dtype), tensors["blocks.0.ln0.weight"].to(dtype),
                                   tensors["blocks.0.ln0.bias"].to(dtype))
    return out


RESCALED_MATRICES = ("att.output.weight", "ffn.value.weight")  # what the fp16 rescale divides


def rescale_factor(key: str, every: int) -> int:
    """What rescale_for_fp16 divides the matrix `key` (blocks.i.<name>) by: 2^(i // every), or 1."""
    if not every or not key.startswith("blocks.") or not key.endswith(RESCALED_MATRICES):
        return 1
    return 2 ** (int(key.split(".")[1]) // every)


def rescale_for_fp16(layer: Mapping[str, torch.Tensor], layer_id: int, every: int) -> dict[str, torch.Tensor]:
    """One block's tensors (names without the blocks.i. prefix)."""
    out = dict(layer)
    scale = 2 ** (layer_id // every)
    for name in RESCALED_MATRICES:
        out[name] = layer[name] / scale
    return out


def precompute_decay(layer: Mapping[str, torch.Tensor], module, spec, layer_id: int) -> dict:
    return module.prepare_layer(dict(layer), spec, layer_id)


def stack_projections(layer: Mapping[str, object], names: tuple[str, ...]) -> dict:
    """Replace the float projections `names` by one StackedFloatWeight, when they share shape and dtype."""
    weights = [layer.get(n) for n in names if n in layer]
    if len(weights) < 2 or not all(isinstance(w, FloatWeight) for w in weights):
        return dict(layer)
    if len({(tuple(w.weight.shape), w.weight.dtype, w.weight.device) for w in weights}) != 1:
        return dict(layer)
    present = tuple(n for n in names if n in layer)
    out = {k: v for k, v in layer.items() if k not in present}
    out[PROJECTIONS_KEY] = StackedFloatWeight(present, torch.stack([w.weight.t() for w in weights]).contiguous())
    return out
