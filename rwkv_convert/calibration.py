"""Activation statistics for calibration-aware quantization: the reference runner reads a calibration text and
records, for every large matrix, the mean square of each input channel (what multiplies weight column j).
A quantizer weighting its rounding error by these keeps the columns that meet large activations exact
(llama.cpp's importance matrix holds the same sums)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch

from . import passes
from .bundled import CALIBRATION_TEXT, bundled_file
from .checkpoint import Checkpoint
from .errors import RwkvConvertError
from .prepare import Preparation
from .progress import step
from .quant.float_weights import FloatWeight
from .quant.gptq import quantize_gptq
from .quant.rwkv_int8 import quantize_rwkv_int8_gptq
from .runner import Model
from .tokenizer import default_tokenizer

BUNDLED = "bundled"  # --calibration bundled: the text shipped with the package


class _Recording:
    """A weight that adds the squares of its inputs (full: their outer products, x x^T) to a running sum
    before multiplying."""

    def __init__(self, inner, sums: dict, key: str, full: bool = False):
        self.inner, self.sums, self.key, self.full = inner, sums, key, full

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.detach().float().reshape(-1, x.shape[-1])
        total, count = self.sums.get(self.key, (0.0, 0))
        # one window's sum in fp32 (BLAS speed), the running total over windows in fp64
        moment = (flat.t() @ flat if self.full else (flat * flat).sum(0)).double()
        self.sums[self.key] = (total + moment, count + flat.shape[0])
        return self.inner.matmul(x)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def describe(method: str, text: str | Path) -> str:
    """How a file was calibrated, as its metadata says it: "gptq on the bundled text", "rounding on notes.txt"."""
    return f"{method} on {'the bundled text' if str(text) == BUNDLED else Path(text).name}"


def calibration_bytes(text: str | Path) -> bytes:
    path = bundled_file(CALIBRATION_TEXT) if str(text) == BUNDLED else Path(text)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise RwkvConvertError(f"cannot read the calibration text {path}: {e.strerror or e}") from None
    if len(data) < 64:
        raise RwkvConvertError(f"the calibration text {path} has {len(data)} bytes; give at least a few thousand")
    return data


def calibration_tokens(ckpt: Checkpoint, text: str | Path, max_tokens: int = 16384) -> list[int]:
    """The tokens of `text` that calibration runs (up to max_tokens)."""
    return default_tokenizer(ckpt.spec.vocab_size).encode_bytes(calibration_bytes(text))[:max_tokens]


def _windows(ckpt: Checkpoint, text: str | Path, max_tokens: int, window: int) -> list[list[int]]:
    tokens = calibration_tokens(ckpt, text, max_tokens)
    return [tokens[i:i + window] for i in range(0, len(tokens), window)]


def activation_importance(ckpt: Checkpoint, text: str | Path, max_tokens: int = 16384, window: int = 1024,
                          head_covariance: bool = False) -> dict[str, torch.Tensor]:
    """{matrix key (e.g. blocks.3.att.key.weight, head.weight): mean square of its input per column, [in]}
    over up to `max_tokens` tokens of `text` (BUNDLED: the bundled calibration text), in windows of `window`
    tokens each from a fresh state. head_covariance: head.weight's entry is E[x x^T] [in, in] (float64)."""
    model = Model(ckpt, "cpu fp32", skip_passes=(passes.STACK,))  # one matmul per matrix: each is seen
    sums: dict[str, tuple[torch.Tensor, int]] = {}
    for i, lw in enumerate(model.layers):
        for name in model.module.MATRICES:
            if name in lw:
                lw[name] = _Recording(lw[name], sums, f"blocks.{i}.{name}")
    model.head = _Recording(model.head, sums, "head.weight", full=head_covariance)
    with torch.no_grad():
        for chunk in _windows(ckpt, text, max_tokens, window):
            model.forward(chunk, None, full_output=True)
    return {key: total / count for key, (total, count) in sums.items()}


class LayerwiseGptq:
    """GPTQ of a model's matrices layer by layer, in the order a file writer asks for them: the calibration
    windows are carried through the model one layer at a time; a layer's matrices are quantized from the
    second moments of their inputs (with every earlier layer already quantized, as GPTQ does), and the windows
    then go on through the quantized layer. Memory: the windows' activations, one layer's moment matrices and
    one layer's blocks, whatever the layer count. The head is quantized from its inputs in the full-precision
    model (a file writes it before the layers).

    qtypes: {our key (blocks.i.<matrix>, head.weight): a codec of quant.gptq (a GGUF type, or MatMulNBits'
    blocks), or a function (weight [out, in] fp32 tensor, E[x x^T] [in, in]) -> (what it makes, the [out, in]
    values that holds, fp32 numpy)}; blocks(key) -> its blocks (or what the function made)."""

    def __init__(self, ckpt: Checkpoint, text: str | Path, qtypes: dict[str, str | Callable],
                 head_moments: torch.Tensor | None = None, max_tokens: int = 16384, window: int = 1024):
        """head_moments: E[x x^T] of the head's inputs, where activation_importance(head_covariance=True) has
        measured it already (else measured here when the head is to be quantized)."""
        self.ckpt, self.qtypes = ckpt, dict(qtypes)
        self.model = Model(ckpt, "cpu fp32", skip_passes=(passes.STACK,))
        self.windows = [torch.tensor(c) for c in _windows(ckpt, text, max_tokens, window)]
        if head_moments is None and "head.weight" in self.qtypes:
            head_moments = activation_importance(ckpt, text, max_tokens, window, head_covariance=True)["head.weight"]
        self._head_moments = head_moments
        with torch.inference_mode():
            self.x = [self.model.embed(ids) for ids in self.windows]
        self.states = [self.model.init_state() for _ in self.windows]
        self.contexts = [self.model.layer_context(ids, state) for ids, state in zip(self.windows, self.states,
                                                                                    strict=True)]
        self.next_layer = 0
        self.ready: dict[str, np.ndarray] = {}

    def __contains__(self, key: str) -> bool:
        return key in self.qtypes

    def blocks(self, key: str):
        if key not in self.ready:
            if key == "head.weight":
                self._quantize(key, self._head_moments)
            else:
                layer = int(key.split(".")[1])
                if layer < self.next_layer:
                    raise ValueError(f"internal: {key} asked for after its layer was passed")
                self.ready = {k: v for k, v in self.ready.items() if k == "head.weight"}  # earlier layers: written
                while self.next_layer <= layer:
                    self._advance()
        return self.ready.pop(key)

    def _quantize(self, key: str, moments: torch.Tensor) -> np.ndarray:
        weight, how = self.ckpt.tensors[key].float(), self.qtypes[key]
        if callable(how):
            made, values = how(weight, moments.numpy())
        else:
            made, values = quantize_gptq(weight.numpy(), moments.numpy(), how)
        self.ready[key] = made
        return values

    def _advance(self) -> None:
        i, module, per_layer = self.next_layer, self.model.module, self.model.state_per_layer
        step("calibrating (GPTQ) layer by layer", i, self.ckpt.spec.n_layer)
        lw = dict(self.model.layers[i])
        keys = {name: f"blocks.{i}.{name}" for name in module.MATRICES if f"blocks.{i}.{name}" in self.qtypes}
        sums: dict = {}
        recording = dict(lw, **{name: _Recording(lw[name], sums, key, full=True) for name, key in keys.items()})
        with torch.inference_mode():
            for x, state, ctx in zip(self.x, self.states, self.contexts, strict=True):
                module.layer_forward(recording, x, [t.clone() for t in state[i * per_layer:(i + 1) * per_layer]],
                                     dict(ctx))
            for name, key in keys.items():
                total, count = sums[key]
                lw[name] = FloatWeight(torch.from_numpy(self._quantize(key, total / count)))
            for n, (state, ctx) in enumerate(zip(self.states, self.contexts, strict=True)):
                layer_state = state[i * per_layer:(i + 1) * per_layer]
                x = module.layer_forward(lw, self.x[n], layer_state, ctx)
                state[i * per_layer:(i + 1) * per_layer] = layer_state
                if self.model.rescale_layer and (i + 1) % self.model.rescale_layer == 0:
                    x = x / 2
                self.x[n] = x
        self.next_layer += 1


class PipInt8Gptq:
    """The pip package's int8 for a strategy's int8 slots with its levels chosen by GPTQ, layer by layer
    (LayerwiseGptq over quant.rwkv_int8.quantize_rwkv_int8_gptq): the same companions, file size and kernel as
    the package's scheme, less output error. Pass it as Preparation(..., quantizer=) and the matrices are
    made as the model prepares them, in layer order."""

    def __init__(self, ckpt: Checkpoint, text: str | Path, model: Preparation):
        spec, slots = ckpt.spec, model.placements
        keys = {f"blocks.{i}.{name}": slots[i] for i in range(spec.n_layer) for name in model.module.MATRICES
                if f"blocks.{i}.{name}" in ckpt.tensors and slots[i].weights == "i8"}
        if slots[spec.n_layer].weights == "i8":
            keys["head.weight"] = slots[spec.n_layer]
        self.gptq = LayerwiseGptq(ckpt, text, {
            key: partial(self._one, atype=slot.atype, factor=passes.rescale_factor(key, model.rescale_layer))
            for key, slot in keys.items()})

    @staticmethod
    def _one(weight: torch.Tensor, hessian: np.ndarray, atype: torch.dtype, factor: int):
        # the file's weight; the model holds it divided by the fp16 rescale's power of 2 (exact)
        made, values = quantize_rwkv_int8_gptq(weight / factor, atype, hessian)
        return made, values.numpy() * factor

    def __call__(self, key: str, weight: torch.Tensor, placement):
        return self.gptq.blocks(key) if key in self.gptq else None


def tensor_sensitivity(ckpt: Checkpoint, text: str | Path, rounded: dict, max_tokens: int = 2048,
                       window: int = 512) -> dict[str, float]:
    """{key: mean KL(reference || the model with only that tensor replaced by rounded[key]) on `text`}: how
    much each tensor's rounding alone costs the model's next-token distribution. rounded: {our key (emb.weight,
    head.weight, blocks.i.<matrix>, or a LoRA factor blocks.i.att.w1 ...): the tensor, in our layout, as a
    quantizer would leave it}."""
    chunks = [c for c in _windows(ckpt, text, max_tokens, window) if len(c) > 1]
    # ln0 at run time, so that the embedding is the table as a GGUF holds it; one matmul per matrix
    model = Model(ckpt, "cpu fp32", skip_passes=(passes.FOLD_LN0, passes.STACK))

    def log_probs() -> list[torch.Tensor]:
        return [torch.log_softmax(model.forward(c, None, full_output=True)[0], -1) for c in chunks]

    reference = log_probs()
    out = {}
    for k, (key, tensor) in enumerate(rounded.items()):
        step("measuring each tensor's cost to the model", k, len(rounded))
        if key == "emb.weight":
            saved, model.emb = model.emb, tensor.float()
        elif key == "head.weight":
            saved, model.head = model.head, FloatWeight(tensor.float())
        else:
            layer, name = key.removeprefix("blocks.").split(".", 1)
            lw = model.layers[int(layer)]
            lora = name in getattr(model.module, "LORA_PARAMS", ())  # multiplied as a plain tensor (lora_product)
            saved, lw[name] = lw[name], tensor.float() if lora else FloatWeight(tensor.float())
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
