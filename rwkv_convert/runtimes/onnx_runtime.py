"""Running an exported ONNX model in onnxruntime, with the runner's interface (`forward(tokens, state,
full_output)` and a batched `forward_batch`), so `verify` treats ONNX like any other format."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import torch

from ..arch import module_for, state_names
from ..client_files import client_view
from ..errors import RwkvConvertError, brief
from ..precision import by_onnx
from ..spec import ModelSpec
from . import onnx_checksums as checksums
from .base import Client
from .onnx_layout import FORMAT_TAG, onnx_module, sequence_path

CLIENT = Client("onnxruntime", "onnxruntime", "onnxruntime", "runs ONNX exports",
                "pip install onnxruntime (or onnxruntime-gpu for the CUDA provider)")


def _ort():
    return CLIENT.imported("running ONNX files")


def _session(path: Path, providers, checked: set):
    ort = _ort()
    # before onnxruntime, which would run altered weights as is and trusts the data entries
    locations = checksums.check(path, onnx_module(), checked)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        # onnxruntime gets the checked files alone, under our names (client_files)
        with client_view({"model.onnx": path} | {loc: path.parent / loc for loc in locations}) as view:
            return ort.InferenceSession(str(view.path("model.onnx")), options, providers=providers)
    except RwkvConvertError:
        raise
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/... types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RwkvConvertError(f"onnxruntime could not load {path}: {brief(first, 300)}") from None


class OnnxModel:
    """An exported model: the step graph and/or the sequence graph beside it."""

    def __init__(self, path, providers: list[str] | None = None):
        ort = _ort()
        path = Path(path)
        if providers is None:
            available = ort.get_available_providers()
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        checked: set = set()  # weights the two graphs share are checked once
        first = _session(path, providers, checked)
        meta = first.get_modelmeta().custom_metadata_map
        if meta.get("rwkv.format") != FORMAT_TAG:
            raise RwkvConvertError(f"{path} is not an ONNX export of rwkv-convert (no rwkv.* metadata): this"
                                   " runner needs the inputs and state layout our exports declare")
        self.path = path
        self.meta = meta
        try:
            self._read_metadata(path, meta, providers, checked, first)
        except (KeyError, TypeError, ValueError) as e:  # a truncated or altered file whose checksum entry went too
            raise RwkvConvertError(f"{path} is a damaged ONNX export: its rwkv.* metadata is incomplete or altered"
                                   f" ({type(e).__name__}: {brief(e, 80)}); export it again") from None

    def _read_metadata(self, path: Path, meta: dict, providers, checked: set, first) -> None:
        self.spec = ModelSpec(**json.loads(meta["rwkv.spec"]))
        # The runner's per-layer state is [att_shift, *wkv parts, ffn_shift]; the export stacks the wkv parts
        # (v4's aa, bb, pp) into one tensor per layer, or holds the one part (v5-v7's matrix) as it is.
        self.version = module_for(self.spec.version)
        self.plain_per_layer = len(self.version.STATE_NAMES)  # att_shift, wkv part(s), ffn_shift
        self.per_layer = len(state_names(self.spec)[0])  # and DEA's caches and last query
        self.state_names = ["shift", "wkv"] + (["dea_k", "dea_v", "dea_q", "context"] if self.spec.dea else [])
        self.dtype, self.quant = meta["rwkv.dtype"], meta["rwkv.quant"]
        self.step = self.sequence = None
        self.sequence_logits = None
        if meta["rwkv.graph"] == "step":
            self.step = first
            sibling = sequence_path(path)
            if sibling.exists():
                self.sequence = _session(sibling, providers, checked)
                self.sequence_logits = self.sequence.get_modelmeta().custom_metadata_map["rwkv.logits"]
        else:
            self.sequence, self.sequence_logits = first, meta["rwkv.logits"]
            if path.name.endswith(".seq.onnx"):
                sibling = path.with_name(path.name[: -len(".seq.onnx")] + ".onnx")
                if sibling.exists():
                    self.step = _session(sibling, providers, checked)
        graph = self.step or self.sequence
        shapes = {i.name: i.shape for i in graph.get_inputs()}
        self.shift_shape = tuple(shapes["shift_in"][1:])
        self.wkv_shape = tuple(shapes["wkv_in"][1:])
        initial = meta.get("rwkv.initial_wkv_fp32_b64")
        self._initial_wkv = (np.frombuffer(base64.b64decode(initial), "<f4").reshape(self.wkv_shape)
                             if initial else None)

    def step_or_sequence_providers(self) -> list[str]:
        return (self.step or self.sequence).get_providers()

    @property
    def runner_name(self) -> str:
        return f"onnxruntime {', '.join(self.step_or_sequence_providers())}"

    @property
    def strategy(self) -> str:
        return f"{self.scheme} export"

    @property
    def weight_schemes(self) -> set[str]:
        return {self.scheme}

    @property
    def scheme(self) -> str:
        """The bound of this export's matrices in the precision table."""
        return by_onnx(self.dtype if self.quant == "none" else self.quant).bound

    # ---- state -----------------------------------------------------------------------------------
    # A batch state is a tuple of arrays in the graphs' input order: shift, wkv, and for DEA ("7b") the caches,
    # the last queries and the context's token ids, whose length axis grows with each call.
    def init_batch_state(self, batch: int = 1) -> tuple[np.ndarray, ...]:
        """The state forward_batch starts a batch from (the runner's init_state, for `batch` streams at once)."""
        shift = np.zeros((batch, *self.shift_shape), np.float32)
        if self._initial_wkv is not None:
            wkv = np.repeat(self._initial_wkv[None], batch, axis=0).copy()
        else:
            fresh = self.version.init_state(self.spec, {}, torch.float32, "cpu")  # v4's pp starts at -1e30
            wkv = np.repeat(np.stack([self._pack_wkv(fresh)] * self.spec.n_layer)[None], batch, axis=0)
        if not self.spec.dea:
            return shift, wkv
        L, cache, query = self.spec.n_layer, self.spec.variant_dims["dea_cache"], self.spec.variant_dims["dea_query"]
        return (shift, wkv, np.zeros((batch, L, 0, cache), np.float32), np.zeros((batch, L, 0, cache), np.float32),
                np.zeros((batch, L, query), np.float32), np.zeros((batch, 0), np.int64))

    def _pack_wkv(self, layer_state: list) -> np.ndarray:
        parts = [torch.as_tensor(t).float().cpu().numpy() for t in layer_state[1:self.plain_per_layer - 1]]
        return np.stack(parts) if len(parts) > 1 else parts[0]

    def _check_batch_state(self, state, batch: int) -> tuple[np.ndarray, ...]:
        if state is None:
            return self.init_batch_state(batch)
        names = self.state_names
        if not isinstance(state, (tuple, list)) or len(state) != len(names):
            raise RwkvConvertError(f"an ONNX model's state is a tuple ({', '.join(names)}) as returned by"
                                   " forward_batch")
        fresh = self.init_batch_state(batch)
        length = np.shape(state[-1])[1] if self.spec.dea and np.ndim(state[-1]) == 2 else None
        out = []
        for name, value, blank in zip(names, state, fresh, strict=True):
            value = np.asarray(value, dtype=blank.dtype)
            expected = tuple(length if (self.spec.dea and name in ("dea_k", "dea_v") and axis == 2)
                             or (name == "context" and axis == 1) else size for axis, size in enumerate(blank.shape))
            if value.shape != expected:
                raise RwkvConvertError(f"{name} state has shape {value.shape}, expected {expected} for this"
                                       f" RWKV-{self.spec.variant} export with batch {batch}")
            out.append(value)
        return tuple(out)

    def to_runner_state(self, *arrays: np.ndarray) -> list[torch.Tensor]:
        """Batch row 0 as the runner's state list."""
        shift, wkv, *dea = arrays
        state = []
        n_parts = self.plain_per_layer - 2
        for i in range(self.spec.n_layer):
            layer_wkv = [torch.from_numpy(wkv[0, i, j].copy()) for j in range(n_parts)] if n_parts > 1 \
                else [torch.from_numpy(wkv[0, i].copy())]
            state += [torch.from_numpy(shift[0, i, 0].copy()), *layer_wkv, torch.from_numpy(shift[0, i, 1].copy())]
            state += [torch.from_numpy(a[0, i].copy()) for a in dea[:3]]
        if dea:
            state.append(torch.from_numpy(dea[3][0].copy()))
        return state

    def from_runner_state(self, state) -> tuple[np.ndarray, ...]:
        per_layer, plain = self.per_layer, self.plain_per_layer
        expected = per_layer * self.spec.n_layer + (1 if self.spec.dea else 0)
        if not isinstance(state, (list, tuple)) or len(state) != expected:
            n = len(state) if isinstance(state, (list, tuple)) else type(state).__name__
            raise RwkvConvertError(f"state has {n} tensors; this RWKV-{self.spec.variant} export with"
                                   f" {self.spec.n_layer} layers needs {expected}")
        shift, wkv, *dea = self.init_batch_state(1)
        if dea:
            length = len(state[-1])
            dea = [np.zeros((1, self.spec.n_layer, length, a.shape[3]), np.float32) for a in dea[:2]] + \
                [dea[2], np.asarray(torch.as_tensor(state[-1]).cpu().numpy(), np.int64)[None]]
        for i in range(self.spec.n_layer):
            layer = [torch.as_tensor(t).float().cpu().numpy() for t in state[i * per_layer:(i + 1) * per_layer]]
            try:
                shift[0, i, 0], shift[0, i, 1] = layer[0], layer[plain - 1]
                wkv[0, i] = self._pack_wkv(layer)
                for j, array in enumerate(dea[:3]):
                    array[0, i] = layer[plain + j]
            except ValueError:
                raise RwkvConvertError(f"state of layer {i} has shapes {[tuple(t.shape) for t in layer]}, expected"
                                       f" shift {self.shift_shape[-1:]} and wkv {self.wkv_shape[1:]}") from None
        return (shift, wkv, *dea)

    # ---- running ---------------------------------------------------------------------------------
    def forward_batch(self, tokens, state=None, full_output: bool = False):
        """tokens [B, T] (ints); state: the tuple forward_batch returned (numpy arrays), or None. Returns logits
        [B, V] (last token) or [B, T, V], and the new state."""
        tokens = np.asarray(tokens, dtype=np.int64)
        if tokens.ndim != 2 or tokens.size == 0:
            raise RwkvConvertError("forward_batch needs token ids shaped [batch, time]")
        if tokens.min() < 0 or tokens.max() >= self.spec.vocab_size:
            raise RwkvConvertError(f"token ids must lie in 0..{self.spec.vocab_size - 1}")
        state = self._check_batch_state(state, tokens.shape[0])
        T = tokens.shape[1]
        use_sequence = self.sequence is not None and (T > 1 or self.step is None) and \
            (self.sequence_logits == "all" or not full_output)
        inputs = [name + "_in" for name in self.state_names]
        if use_sequence:
            logits, *state = self.sequence.run(None, {"tokens": tokens, **dict(zip(inputs, state, strict=True))})
            if self.sequence_logits == "all" and not full_output:
                logits = logits[:, -1]
            return logits, tuple(state)
        if self.step is None:
            raise RwkvConvertError(f"{self.path} has only a sequence graph with the last logits: export with"
                                   " --logits all (or the step graph) for every position's logits")
        rows = []
        for t in range(T):
            logits, *state = self.step.run(None, {"token": tokens[:, t], **dict(zip(inputs, state, strict=True))})
            rows.append(logits)
        return (np.stack(rows, axis=1) if full_output else rows[-1]), tuple(state)

    def forward(self, tokens, state=None, full_output: bool = False):
        """The runner's interface for one stream: state is the runner's per-layer list."""
        if isinstance(tokens, int):
            tokens = [tokens]
        tokens = list(torch.as_tensor(tokens).flatten().tolist()) if isinstance(tokens, torch.Tensor) else tokens
        if not tokens:
            raise RwkvConvertError("forward() needs a non-empty list of token ids")
        batch_state = None if state is None else self.from_runner_state(state)
        logits, state = self.forward_batch([tokens], batch_state, full_output)
        return torch.from_numpy(np.ascontiguousarray(logits[0])), self.to_runner_state(*state)
