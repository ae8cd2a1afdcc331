"""`convert --to onnx`: a one-token step graph and a sequence (prefill) graph for v4, v5.x, v6 and v7, built
by hand from the checkpoint's tensors (no nn.Module, no tracing), so names, dtypes and external data are ours.

Interface of both graphs (the `rwkv.*` metadata repeats it):
  inputs   token int64 [B] (step) | tokens int64 [B, T] (sequence); shift_in fp32 [B, L, 2, C];
           wkv_in fp32 [B, L, *wkv]   (v4: [3, A] = aa, bb, pp; v5/v6: [H, N_key, N_val]; v7: [H, N_val, N_key])
  outputs  logits fp32 [B, V] (step; sequence with --logits last) | [B, T, V] (sequence, --logits all);
           shift_out, wkv_out (same shapes as the inputs)
A fresh state is zeros, except v4's pp (-1e30) and a state-tuned model's learned wkv (in the metadata)."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ... import arch
from ...arch.common import as_vector, layer_norm
from ...atomic import AtomicOutput
from ...calibration import LayerwiseGptq, activation_importance, describe
from ...checkpoint import Checkpoint
from ...errors import RwkvConvertError
from ...passes import rescale_factor, rescale_for_fp16
from ...precision import onnx_dtypes, onnx_quants
from ...quant import matmul_nbits
from ...runtimes.onnx_layout import FORMAT_TAG, data_path, onnx_module, sequence_path
from ...spec import ModelSpec
from ...strategy import parse_strategy
from ..base import Options, calibration_method_option, option
from . import v4, v5, v6, v7
from .emit import ACCURACY_LEVELS, LORA_BITS, QUANT_BITS, Emitter, as_array
from .graph import Graph, WeightStore

DTYPES = onnx_dtypes()
QUANTS = ("none", *onnx_quants())
LOGITS = ("all", "last")
GRAPHS = ("both", "step", "sequence")
INLINE_LIMIT = 2 * 1024 ** 3 - 64 * 1024 ** 2  # protobuf's 2 GB limit, less room for the graph itself
GRAPH_MODULES = {version: module for module in (v4, v5, v6, v7) for version in module.VERSIONS}


class _FoldedRows:
    """A per-token table with the ln0'd embedding folded in (row(t) = table[t] + E[t] @ fold^T, in fp32 as the
    runner does), made in row blocks as the export writes it: the table is never whole in memory."""

    ROWS = 2048

    def __init__(self, ckpt, table: str, fold: str):
        self.ckpt, self.table, self.fold = ckpt, table, fold
        self.shape = tuple(ckpt.shapes[table])

    def blocks(self, np_dtype):
        tensors = self.ckpt.tensors
        emb, table, fold = tensors["emb.weight"], tensors[self.table], tensors[self.fold].float()
        w, b = (tensors[f"blocks.0.ln0.{n}"].float() for n in ("weight", "bias"))
        for start in range(0, self.shape[0], self.ROWS):
            rows = slice(start, start + self.ROWS)
            folded = table[rows].float() + layer_norm(emb[rows].float(), w, b) @ fold.t()
            yield as_array(folded, np_dtype)
            self.ckpt.release(self.table, rows)  # read once: its pages need not stay


def _layer_tensors(ckpt, spec, i: int, rescale: int) -> dict:
    module = arch.module_for(spec.version)
    graphs = GRAPH_MODULES[spec.version]
    tables = arch.token_tables(spec)
    prefix = f"blocks.{i}."
    lw = {}
    for k in ckpt.tensors:
        if k.startswith(prefix) and not k.startswith(prefix + "ln0."):
            name = k[len(prefix):]
            if name in tables:  # written in row blocks when the graph first gathers from it
                lw[name] = _FoldedRows(ckpt, k, prefix + tables[name])
                continue
            if name in tables.values():  # folded into its table
                continue
            t = ckpt.tensors[k]
            if name in module.MATRICES:  # converted once, straight into the initializer's dtype and layout
                lw[name] = t
                continue
            lw[name] = as_vector(t.float())
    if rescale:
        lw = rescale_for_fp16(lw, i, rescale)
    return graphs.prepare_layer(lw, spec, i)


class _CalibratedBlocks:
    """MatMulNBits inputs chosen from a calibration text run through the reference runner: by GPTQ, layer by
    layer in the order the graph asks for the matrices (calibration.LayerwiseGptq), or by importance-weighted
    rounding alone. The blocks stay onnxruntime's own format; only their scales, zero points and levels differ."""

    def __init__(self, ckpt, spec, text: str, method: str, bits: int, act: str, head_bits: int | None,
                 rescale: int):
        self.scale_dtype, self.rescale = act, rescale
        module = arch.module_for(spec.version)
        self.bits = {f"blocks.{i}.{name}": bits for i in range(spec.n_layer) for name in module.MATRICES
                     if f"blocks.{i}.{name}" in ckpt.tensors}
        if head_bits:
            self.bits["head.weight"] = head_bits
        self.gptq = self.importance = None
        if method == "gptq":
            codecs = {key: matmul_nbits.codec_name(b, act) for key, b in self.bits.items()}
            self.gptq = LayerwiseGptq(ckpt, text, codecs)
        else:
            self.importance = activation_importance(ckpt, text)

    def inputs(self, key: str, w: torch.Tensor, bits: int):
        """(data, scales, zero points) of the [out, in] matrix `key` as the graph holds it (fp16-rescaled
        where the export rescales), or None for a matrix not calibrated here."""
        if self.bits.get(key) != bits:
            return None
        n, k = w.shape
        if self.gptq is None:
            return matmul_nbits.quantize(w.float().numpy(), bits, self.scale_dtype, self.importance[key].numpy())
        data, scales, zero_points = matmul_nbits.unpack(self.gptq.blocks(key), n, k, bits, self.scale_dtype)
        factor = rescale_factor(key, self.rescale)  # GPTQ saw the file's weight, the graph holds it rescaled
        return data, scales / np.asarray(factor, scales.dtype), zero_points  # a power of 2: exact


class _Lazy:
    """A tensor made only if the graph needs it (the second graph of an export reuses the first's)."""

    def __init__(self, make):
        self.make = make


def _folded_embedding(ckpt, np_dtype) -> _Lazy:
    """emb with ln0 folded in (in fp32, as the runner does), made in row chunks into the output dtype, so
    that the peak is one table of the output, not three fp32 copies."""
    def make() -> torch.Tensor:
        emb = ckpt.tensors["emb.weight"]
        w, b = (ckpt.tensors[f"blocks.0.ln0.{n}"].float() for n in ("weight", "bias"))
        out = torch.empty(emb.shape, dtype=torch.float16 if np_dtype == np.float16 else torch.float32)
        for start in range(0, emb.shape[0], 4096):
            out[start:start + 4096] = layer_norm(emb[start:start + 4096].float(), w, b)
        ckpt.release("emb.weight")
        return out
    return _Lazy(make)


def _initial_wkv(ckpt, spec) -> np.ndarray | None:
    """A state-tuned model's learned wkv state [L, H, N, N] (pip layout), else None."""
    if not spec.time_state:
        return None
    module = arch.module_for(spec.version)
    return np.stack([module.time_state_to_wkv(ckpt.tensors[f"blocks.{i}.att.time_state"]).numpy()
                     for i in range(spec.n_layer)])


def _build(ckpt, spec, store: WeightStore, single_step: bool, dtype: str, quant: str, logits: str,
           rescale: int, table_quant: str = "none", compute: str = "int8",
           calibrated: _CalibratedBlocks | None = None) -> Graph:
    from onnx import TensorProto

    g = Graph(store, single_step=single_step)
    E = Emitter(g, dtype, quant, compute, calibrated, table_quant)
    mod = GRAPH_MODULES[spec.version]
    L, C, V = spec.n_layer, spec.n_embd, spec.vocab_size
    wkv_shape = arch.module_for(spec.version).wkv_state_shape(spec)
    if single_step:
        tokens = g.unsqueeze(g.input("token", TensorProto.INT64, ["batch"]), 1)
    else:
        tokens = g.input("tokens", TensorProto.INT64, ["batch", "time"])
    shift_in = g.input("shift_in", TensorProto.FLOAT, ["batch", L, 2, C])
    wkv_in = g.input("wkv_in", TensorProto.FLOAT, ["batch", L, *wkv_shape])
    ctx: dict = {"tokens": tokens}
    dea_in = {}
    if spec.dea:  # the attention's state grows with the context: a dynamic length axis
        for name, shape in _dea_state_shapes(spec, "context").items():
            dea_in[name] = g.input(name + "_in", TensorProto.INT64 if name == "context" else TensorProto.FLOAT, shape)
        ctx["context_ids"] = g.op("Concat", dea_in["context"], tokens, axis=1)
    dea_out: dict[str, list] = {name: [] for name in ("dea_k", "dea_v", "dea_q")}

    x = E.gather_rows(_folded_embedding(ckpt, E.np_act), tokens)  # [B, T, C]
    shifts, wkvs = [], []
    for i in range(L):
        lw = _layer_tensors(ckpt, spec, i, rescale)
        prefix = f"blocks.{i}."
        shift = g.gather(shift_in, i, 1)  # [B, 2, C]
        xx = E.layer_norm(x, prefix + "ln1", lw["ln1.weight"], lw["ln1.bias"])
        att, new_wkv = mod.time_mix(E, spec, lw, prefix, xx, E.to_act(g.gather(shift, 0, 1)), g.gather(wkv_in, i, 1),
                                    ctx)
        if spec.dea:
            dea, *caches = mod.dea_attention(E, spec, lw, prefix, x, *(g.gather(dea_in[n], i, 1) for n in dea_out),
                                             ctx)
            att = g.op("Add", att, dea)
            for name, value in zip(dea_out, caches, strict=True):
                dea_out[name].append(g.unsqueeze(value, 1))
        att_last = g.gather(xx, -1, 1)
        x = g.op("Add", x, att)
        xx = E.layer_norm(x, prefix + "ln2", lw["ln2.weight"], lw["ln2.bias"])
        x = g.op("Add", x, mod.channel_mix(E, spec, lw, prefix, xx, E.to_act(g.gather(shift, 1, 1)), ctx))
        last_tokens = [E.to_f32(t) for t in (att_last, g.gather(xx, -1, 1))]  # this layer's new shift, [B, C] x 2
        shifts.append(g.unsqueeze(g.op("Concat", *(g.unsqueeze(t, 1) for t in last_tokens), axis=1), 1))
        wkvs.append(g.unsqueeze(new_wkv, 1))
        if rescale and (i + 1) % rescale == 0:
            x = g.op("Mul", x, E.scalar(0.5))
        for name in list(ckpt.tensors):
            if name.startswith(prefix):
                ckpt.release(name)
    if single_step or logits == "last":
        x = g.gather(x, -1, 1)  # [B, C]
    x = E.layer_norm(x, "ln_out", ckpt.tensors["ln_out.weight"].float(), ckpt.tensors["ln_out.bias"].float())
    out = E.to_f32(E.linear(x, "head.weight", ckpt.tensors["head.weight"], table=True))
    ckpt.release("head.weight")
    g.output(out, "logits", TensorProto.FLOAT, ["batch", V] if single_step or logits == "last"
             else ["batch", "time", V])
    g.output(g.op("Concat", *shifts, axis=1), "shift_out", TensorProto.FLOAT, ["batch", L, 2, C])
    g.output(g.op("Concat", *wkvs, axis=1), "wkv_out", TensorProto.FLOAT, ["batch", L, *wkv_shape])
    if spec.dea:
        shapes = _dea_state_shapes(spec, "context_out")
        for name, parts in dea_out.items():
            g.output(g.op("Concat", *parts, axis=1), name + "_out", TensorProto.FLOAT, shapes[name])
        g.output(ctx["context_ids"], "context_out", TensorProto.INT64, shapes["context"])
    return g


def _dea_state_shapes(spec, length: str) -> dict[str, list]:
    """DEA's state in the graphs, after shift and wkv: the two caches, the last query, the context's ids."""
    L, cache, query = spec.n_layer, spec.variant_dims["dea_cache"], spec.variant_dims["dea_query"]
    return {"dea_k": ["batch", L, length, cache], "dea_v": ["batch", L, length, cache], "dea_q": ["batch", L, query],
            "context": ["batch", length]}


def _metadata(ckpt, spec, graph: str, dtype: str, quant: str, logits: str, rescale: int) -> dict[str, str]:
    version = arch.module_for(spec.version)
    layout = {
        "shift": f"[B, {spec.n_layer}, 2, {spec.n_embd}]: per layer the attention's then the FFN's token-shift"
                 " vector (the LayerNorm output of the last token)",
        "wkv": f"[B, {spec.n_layer}, {', '.join(map(str, version.wkv_state_shape(spec)))}]: {version.WKV_STATE_DOC}",
    }
    if spec.dea:
        cache, query = spec.variant_dims["dea_cache"], spec.variant_dims["dea_query"]
        layout.update({
            "dea_k": f"[B, {spec.n_layer}, n, {cache}]: per layer each context token's key pre-projection (x @ k1)",
            "dea_v": f"[B, {spec.n_layer}, n, {cache}]: per layer each context token's value pre-projection (x @ v1)",
            "dea_q": f"[B, {spec.n_layer}, {query}]: per layer the last token's query (x @ qq^T), for the shift",
            "context": "[B, n] int64: the token ids so far; a fresh state has n = 0 (every *_in with a 0-length axis)",
        })
    meta = {
        "rwkv.format": FORMAT_TAG, "rwkv.graph": graph, "rwkv.version": spec.version,
        "rwkv.spec": json.dumps({k: v for k, v in spec.to_dict().items() if k not in ("dtypes",)}),
        "rwkv.source": ckpt.path.name, "rwkv.source_bytes": str(ckpt.file_size),
        "rwkv.dtype": dtype, "rwkv.quant": quant, "rwkv.logits": "last" if graph == "step" else logits,
        "rwkv.rescale_every": str(rescale), "rwkv.state_layout": json.dumps(layout),
    }
    initial = _initial_wkv(ckpt, spec)
    if initial is not None:
        meta["rwkv.initial_wkv_fp32_b64"] = base64.b64encode(initial.astype("<f4").tobytes()).decode()
    return meta


@dataclass(frozen=True)
class OnnxOptions(Options):
    dtype: str = option("fp32", "fp32 or fp16 weights and activations (inputs, outputs and state stay fp32)",
                        choices=DTYPES, storage="onnx")
    quant: str = option("none", "block-quantize the layers' matrices with onnxruntime's MatMulNBits (the embedding"
                        " and head: see --quant-embedding-head)", flag="--onnx-quant", choices=QUANTS,
                        storage="onnx")
    quant_embedding_head: bool | None = option(None, "with --onnx-quant, also quantize the embedding"
                                               " (GatherBlockQuantized) and the head (MatMulNBits), in --onnx-quant's"
                                               " bits or --embedding-head-quant's; default: float (measured on the"
                                               " bundled v7 with int4 layers: int8 tables save 15% of the bytes for"
                                               " 1.4% more KL; beside int8 layers 9% for 50% more KL)",
                                        flag="--quant-embedding-head/--float-embedding-head")
    embedding_head_quant: str | None = option(None, "with --quant-embedding-head, the embedding's and head's own"
                                              " bits (int8 beside --onnx-quant int4: the two tables most sensitive"
                                              " to rounding keep 8 bits for ~0.03 bytes per parameter more)",
                                              choices=("int8", "int4"))
    graphs: str = option("both", "the one-token step graph (OUT), the sequence graph (OUT with .seq.onnx), or both;"
                         " --graph step|sequence writes that one graph to OUT itself", flag="--graph", choices=GRAPHS)
    logits: str = option("all", "the sequence graph's logits for every position or only the last (faster prefill)",
                         choices=LOGITS)
    compute: str = option("int8", "with --onnx-quant, the type MatMulNBits computes in (onnxruntime's accuracy_level"
                          " 4 or 1): int8 also quantizes the activations per block (fast; about twice the KL of the"
                          " rounded weights alone), fp32 keeps them (slower, int8 weights much slower)",
                          flag="--onnx-compute", choices=tuple(ACCURACY_LEVELS))
    calibration: str | None = option(None, "with --onnx-quant, a text (or 'bundled') run through the reference"
                                     " runner: its activations choose the blocks' scales, zero points and levels"
                                     " (plain MatMulNBits that any onnxruntime runs; see --calibration-method)")
    calibration_method: str = calibration_method_option()
    external_data: bool | None = option(None, "weights in OUT.data beside the graphs (the default for two graphs,"
                                        " which share it, and above protobuf's 2 GB limit) or inside the one graph"
                                        " written", flag="--external-data/--inline-data")


def supports(spec: ModelSpec) -> str | None:
    return None


def write(ckpt: Checkpoint, output: Path, options: OnnxOptions) -> list[Path]:
    """Write the step graph to `output` and the sequence graph beside it (model.seq.onnx), or one of them
    (graphs="step"|"sequence": then to `output` itself). external_data None: the weights go to one data file
    (output + ".data") shared by both graphs, or inline when one graph is written and fits protobuf's 2 GB.
    Returns the paths written (data file last)."""
    onnx_module()  # a clear error before any work when onnx is missing
    spec, dtype, quant, logits = ckpt.spec, options.dtype, options.quant, options.logits
    if output.suffix != ".onnx":
        raise RwkvConvertError(f"the ONNX output name should end in .onnx (got {output.name})")
    kinds = {"both": [("step", output), ("sequence", sequence_path(output))], "step": [("step", output)],
             "sequence": [("sequence", output)]}[options.graphs]
    rescale = arch.rescale_interval(spec, parse_strategy("cpu fp16")) if dtype == "fp16" else 0
    weight_bytes = spec.n_params * (2 if dtype == "fp16" else 4)
    external_data = options.external_data
    if external_data is None:  # two graphs share one copy of the weights; one graph keeps them inline if it can
        external_data = len(kinds) > 1 or weight_bytes > INLINE_LIMIT
    data = data_path(output) if external_data else None
    finals = ([data] if data else []) + [p for _, p in kinds]  # the data first: the graphs refer to it
    table_quant = "none"
    tables = options.quant_embedding_head
    if tables is None:  # the default (OnnxOptions' help says what it costs and saves)
        tables = options.embedding_head_quant is not None
        default_bits = "int8"
    else:
        default_bits = quant
    if tables and quant != "none":
        table_quant = options.embedding_head_quant or default_bits
    elif options.embedding_head_quant:
        raise RwkvConvertError("--embedding-head-quant sets the bits of quantized embedding and head tables: give"
                               " --onnx-quant (and not --float-embedding-head)")
    calibrated = None
    if options.calibration:
        if quant == "none":
            raise RwkvConvertError("--calibration chooses how the quantized blocks round: give --onnx-quant int8 or"
                                   " int4 with it")
        calibrated = _CalibratedBlocks(ckpt, spec, options.calibration, options.calibration_method, QUANT_BITS[quant],
                                       dtype, QUANT_BITS.get(table_quant), rescale)
    with AtomicOutput(*finals) as out:
        store = WeightStore(out.temp(data) if data else None, data.name if data else None)
        try:
            models = []
            for kind, _ in kinds:
                g = _build(ckpt, spec, store, kind == "step", dtype, quant, logits, rescale, table_quant,
                           options.compute, calibrated)
                doc = f"RWKV-{spec.variant} {kind} graph from {ckpt.path.name}, written by rwkv-convert"
                meta = _metadata(ckpt, spec, kind, dtype, quant, logits, rescale)
                meta["rwkv.quant_scope"] = "layers" if table_quant == "none" else "all"
                meta["rwkv.table_quant"] = table_quant
                meta["rwkv.lora_quant"] = f"int{LORA_BITS}" if quant != "none" else "none"
                if quant != "none":
                    meta["rwkv.compute"] = options.compute
                    meta["rwkv.calibration"] = (describe(options.calibration_method, options.calibration)
                                                if options.calibration else "none")
                models.append(g.model(doc, meta))
        finally:
            store.close()
        for model, (_, final) in zip(models, kinds, strict=True):
            try:
                serialized = model.SerializeToString()
            except ValueError as e:  # protobuf refuses a message over 2 GB
                raise RwkvConvertError(f"could not write {output}: {e}; use --external-data") from None
            out.temp(final).write_bytes(serialized)
    return [p for _, p in kinds] + ([data] if data else [])
