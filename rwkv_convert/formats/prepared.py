"""Our own safetensors layout: the runner's weights after the plan's passes and weight schemes (ln0 folded,
decays precomputed, fp16-rescaled, projections stacked, int8 with its companions, matrices in the layout
the runner multiplies with), plus the spec, the strategy, the passes and a hash of the source in the
header. Loading maps the file and wraps the tensors: no conversion work. The safe, mmap-able replacement
for the pip package's pickled converted files, for every version including v7."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..atomic import AtomicOutput
from ..calibration import PipInt8Gptq, describe
from ..checkpoint import Checkpoint, file_sha256
from ..errors import RwkvConvertError
from ..plan import make_plan
from ..prepare import Preparation, PreparedWeights
from ..quant.float_weights import FloatWeight, StackedFloatWeight
from ..quant.rwkv_int8 import RwkvInt8Weight
from ..runner import Model
from ..spec import ModelSpec
from ..strategy import parse_strategy
from .base import Format, Options, Probe, option
from .safetensors_io import SafetensorsWriter, read_safetensors

LAYOUT = "prepared"
FORMAT_TAG = "rwkv-convert-prepared-1"
INT8_PARTS = ("q", "mx", "rx", "my", "ry")


def _flatten(key: str, value, kinds: dict) -> dict[str, torch.Tensor]:
    """One runner weight as named tensors; `kinds` records how to wrap them again."""
    if isinstance(value, torch.Tensor):
        return {key: value}
    if isinstance(value, FloatWeight):
        w = value.weight
        if w.dim() == 2 and not w.is_contiguous() and w.t().is_contiguous():  # column-major (gemv_friendly)
            kinds[key] = {"kind": "float", "transposed": True}
            return {key: w.t()}
        kinds[key] = {"kind": "float", "transposed": False}
        return {key: w}
    if isinstance(value, RwkvInt8Weight):
        kinds[key] = {"kind": "i8"}
        return {f"{key}/{part}": getattr(value, part) for part in INT8_PARTS}
    if isinstance(value, StackedFloatWeight):
        kinds[key] = {"kind": "stacked", "names": list(value.names)}
        return {key: value.stacked}
    raise TypeError(f"cannot store a {type(value).__name__} for {key}")


def _wrap(key: str, tensors: dict, kinds: dict):
    info = kinds.get(key)
    if info is None:
        return tensors[key]
    if info["kind"] == "float":
        return FloatWeight(tensors[key].t() if info["transposed"] else tensors[key])
    if info["kind"] == "i8":
        return RwkvInt8Weight(*(tensors[f"{key}/{part}"] for part in INT8_PARTS))
    if info["kind"] == "stacked":
        return StackedFloatWeight(tuple(info["names"]), tensors[key])
    raise RwkvConvertError(f"unknown weight kind {info['kind']!r} for {key}: written by a newer rwkv-convert?")


@dataclass(frozen=True)
class PreparedOptions(Options):
    strategy: str = option("cpu fp32", "the strategy the runner's weights are prepared for (int8 included)")
    calibration: str | None = option(None, "a text (or 'bundled') run through the reference runner: the int8"
                                     " slots' levels are chosen by GPTQ from its activations (the pip package's"
                                     " scheme, same size and kernel, less error)")


def write(ckpt: Checkpoint, output: Path, options: PreparedOptions) -> list[Path]:
    """Prepare the checkpoint for the strategy layer by layer, writing each layer as it is made."""
    plan = make_plan(ckpt.spec, ckpt.shapes, options.strategy)
    prepared = Preparation(ckpt.spec, plan)
    calibration = "none"
    if options.calibration:
        if "i8" not in {p.weights for p in prepared.placements}:
            raise RwkvConvertError(f"--calibration chooses how int8 weights round, and \"{plan.strategy}\" has"
                                   " none: give an i8 strategy (e.g. \"cpu fp32i8\")")
        gptq = PipInt8Gptq(ckpt, options.calibration, prepared)
        prepared = Preparation(ckpt.spec, plan, quantizer=gptq)
        calibration = describe("gptq", options.calibration)
    kinds: dict = {}
    with AtomicOutput(output) as target:
        writer = SafetensorsWriter(target.temp(), align=64)
        try:
            for i, lw in prepared.prepared_parts(ckpt.tensors):
                if i == 0:
                    writer.add("emb.weight", prepared.emb)
                for name, value in lw.items():
                    for key, t in _flatten(f"blocks.{i}.{name}", value, kinds).items():
                        writer.add(key, t)
                for name in [k for k in ckpt.tensors if k.startswith(f"blocks.{i}.")]:
                    ckpt.release(name)
            writer.add("ln_out.weight", prepared.ln_out[0])
            writer.add("ln_out.bias", prepared.ln_out[1])
            for key, t in _flatten("head.weight", prepared.head, kinds).items():
                writer.add(key, t)
            meta = {"format": "pt", "rwkv_convert.layout": LAYOUT, "rwkv_convert.format": FORMAT_TAG,
                    "rwkv_convert.spec": json.dumps(ckpt.spec.to_dict()), "rwkv_convert.strategy": plan.strategy,
                    "rwkv_convert.rescale_layer": str(prepared.rescale_layer),
                    "rwkv_convert.passes": json.dumps(prepared.passes), "rwkv_convert.weights": json.dumps(kinds),
                    "rwkv_convert.source": ckpt.path.name, "rwkv_convert.source_sha256": file_sha256(ckpt.path),
                    "rwkv_convert.calibration": calibration}
            writer.close(meta)
        finally:
            writer.abort()
    return [output]


def read_prepared(path: Path, strategy: str | None) -> Model:
    """A Model from a prepared file; `strategy` must be the file's (or None)."""
    tensors, meta = read_safetensors(path)
    stored = meta.get("rwkv_convert.strategy")
    if meta.get("rwkv_convert.format") != FORMAT_TAG or stored is None:
        raise RwkvConvertError(f"{path} is a prepared file of an unknown format version"
                               f" ({meta.get('rwkv_convert.format')!r}); convert the source again")
    if strategy is not None and str(parse_strategy(strategy)) != stored:
        raise RwkvConvertError(f"{path} was prepared for \"{stored}\", not \"{parse_strategy(strategy)}\":"
                               " load it with that strategy (or none), or prepare the source again")
    try:
        spec = ModelSpec(**json.loads(meta["rwkv_convert.spec"]))
        kinds = json.loads(meta["rwkv_convert.weights"])
        passes = json.loads(meta["rwkv_convert.passes"])
        rescale = int(meta["rwkv_convert.rescale_layer"])
        layers = []
        for i in range(spec.n_layer):
            prefix = f"blocks.{i}."
            keys = {k.split("/")[0] for k in tensors if k.startswith(prefix)}
            layers.append({k[len(prefix):]: _wrap(k, tensors, kinds) for k in sorted(keys)})
        return Model(PreparedWeights(spec, make_plan(spec, None, stored, rescale), path, tensors["emb.weight"], layers,
                                     (tensors["ln_out.weight"], tensors["ln_out.bias"]),
                                     _wrap("head.weight", tensors, kinds), passes))
    except (KeyError, TypeError, ValueError, json.JSONDecodeError) as e:
        raise RwkvConvertError(f"{path} is a damaged prepared file ({type(e).__name__}: {e})") from None


def sniff(probe: Probe) -> bool:
    meta = probe.safetensors_metadata
    return meta is not None and meta.get("rwkv_convert.layout") == LAYOUT


FORMAT = Format(
    name="prepared", family="safetensors", summary="a prepared file (the runner's weights for one strategy)",
    runtime="rwkv-convert's runner", sniff=sniff, load=lambda probe, strategy: read_prepared(probe.path, strategy),
    write=write, options=PreparedOptions)  # the runner runs every version and variant
