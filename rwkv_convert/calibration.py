"""Activation statistics for calibration-aware quantization: the reference runner reads a calibration text and
records, for every large matrix, the mean square of each input channel (what multiplies weight column j).
A quantizer weighting its rounding error by these keeps the columns that meet large activations exact
(llama.cpp's importance matrix holds the same sums)."""

from __future__ import annotations

from pathlib import Path

import torch

from . import passes
from .bundled import CALIBRATION_TEXT, bundled_file
from .checkpoint import Checkpoint
from .errors import RwkvConvertError
from .quant.float_weights import FloatWeight
from .runner import Model
from .tokenizer import default_tokenizer

BUNDLED = "bundled"  # --calibration bundled: the text shipped with the package


class _Recording:
    """A weight that adds the squares of its inputs to a running sum before multiplying."""

    def __init__(self, inner, sums: dict, key: str):
        self.inner, self.sums, self.key = inner, sums, key

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.detach().float().reshape(-1, x.shape[-1])
        total, count = self.sums.get(self.key, (0.0, 0))
        self.sums[self.key] = (total + (flat * flat).sum(0), count + flat.shape[0])
        return self.inner.matmul(x)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def calibration_bytes(text: str | Path) -> bytes:
    path = bundled_file(CALIBRATION_TEXT) if str(text) == BUNDLED else Path(text)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise RwkvConvertError(f"cannot read the calibration text {path}: {e.strerror or e}") from None
    if len(data) < 64:
        raise RwkvConvertError(f"the calibration text {path} has {len(data)} bytes; give at least a few thousand")
    return data


def activation_importance(ckpt: Checkpoint, text: str | Path, max_tokens: int = 16384,
                          window: int = 1024) -> dict[str, torch.Tensor]:
    """{matrix key (e.g. blocks.3.att.key.weight, head.weight): mean square of its input per column, [in]}
    over up to `max_tokens` tokens of `text` (BUNDLED: the bundled calibration text), in windows of `window`
    tokens each from a fresh state."""
    tokens = default_tokenizer(ckpt.spec.vocab_size).encode_bytes(calibration_bytes(text))[:max_tokens]
    model = Model(ckpt, "cpu fp32", skip_passes=(passes.STACK,))  # one matmul per matrix: each is seen
    sums: dict[str, tuple[torch.Tensor, int]] = {}
    for i, lw in enumerate(model.layers):
        for name in model.module.MATRICES:
            if name in lw:
                lw[name] = _Recording(lw[name], sums, f"blocks.{i}.{name}")
    model.head = _Recording(model.head, sums, "head.weight")
    with torch.no_grad():
        for start in range(0, len(tokens), window):
            model.forward(tokens[start:start + window], None, full_output=True)
    return {key: total / count for key, (total, count) in sums.items()}


def tensor_sensitivity(ckpt: Checkpoint, text: str | Path, rounded: dict, max_tokens: int = 2048,
                       window: int = 512) -> dict[str, float]:
    """{key: mean KL(reference || the model with only that tensor replaced by rounded[key]) on `text`}: how
    much each tensor's rounding alone costs the model's next-token distribution. rounded: {our key (emb.weight,
    head.weight, blocks.i.<matrix>): the [out, in] tensor as a quantizer would leave it}."""
    tokens = default_tokenizer(ckpt.spec.vocab_size).encode_bytes(calibration_bytes(text))[:max_tokens]
    chunks = [tokens[i:i + window] for i in range(0, len(tokens), window) if len(tokens[i:i + window]) > 1]
    # ln0 at run time, so that the embedding is the table as a GGUF holds it; one matmul per matrix
    model = Model(ckpt, "cpu fp32", skip_passes=(passes.FOLD_LN0, passes.STACK))

    def log_probs() -> list[torch.Tensor]:
        return [torch.log_softmax(model.forward(c, None, full_output=True)[0], -1) for c in chunks]

    reference = log_probs()
    out = {}
    for key, tensor in rounded.items():
        if key == "emb.weight":
            saved, model.emb = model.emb, tensor.float()
        elif key == "head.weight":
            saved, model.head = model.head, FloatWeight(tensor.float())
        else:
            layer, name = key.removeprefix("blocks.").split(".", 1)
            lw = model.layers[int(layer)]
            saved, lw[name] = lw[name], FloatWeight(tensor.float())
        kl = sum(float((ref.exp() * (ref - got)).sum(-1).clamp_min(0).sum()) for ref, got in zip(reference, log_probs(),
                                                                                               strict=True))
        out[key] = kl / sum(len(c) for c in chunks)
        if key == "emb.weight":
            model.emb = saved
        elif key == "head.weight":
            model.head = saved
        else:
            model.layers[int(layer)][name] = saved
    return out
