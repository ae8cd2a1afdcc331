"""Converted files in the `rwkv` pip package's own format (what its `convert_and_save_and_exit` writes):
the tensors after its load-time transforms for one strategy, plus `_strategy`, `_rescale_layer` and
`_version`. `rwkv.model.RWKV(OUT, strategy=S)` loads them without converting again.

Written tensor by tensor from the mmap'd source (the package loads the whole checkpoint first), atomically.
Differences from the package's own converter, both so that the file loads in the package:
- the v5.2/v6 bonus keeps its name `time_faaaa` (the package renames it `time_first`, after which its loader
  can no longer find n_head for v6 and cannot load its own converted v6 files);
- within each block, `ln_x` and `gate` keys come first, so that its key-order version detection sees them
  before `time_decay` (a 1-layer v5.2 file otherwise fails to load)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import passes
from ..arch import build_spec, detect_version, module_for
from ..arch.common import PROJECTIONS_KEY
from ..atomic import AtomicOutput
from ..checkpoint import Checkpoint, ZipRecordCheck
from ..errors import RwkvConvertError, brief
from ..plan import make_plan
from ..prepare import PreparedWeights
from ..quant.float_weights import FloatWeight
from ..quant.rwkv_int8 import RwkvInt8Weight, quantize_rwkv_int8
from ..runner import Model
from ..runtimes.base import ClientRun
from ..runtimes.pip_package import CLIENT as PIP_PACKAGE
from ..runtimes.pip_package import run_in_pip_package
from ..spec import ModelSpec
from ..strategy import DTYPES, parse_strategy
from .base import Format, Options, Probe, option
from .torch_stream import StreamingTorchWriter

FORMAT_VERSION = "0.7"
MATRIX_SUFFIXES = ("key.weight", "value.weight", "receptance.weight", "gate.weight", "output.weight", "head.weight")


def _layer_of(name: str, n_layer: int) -> int:
    if name.startswith("blocks."):
        return int(name.split(".")[1])
    return n_layer if name.startswith(("ln_out.", "head.")) else 0


def _key_order(names: list[str]) -> list[str]:
    def rank(name: str) -> tuple[int, int]:
        layer = int(name.split(".")[1]) if name.startswith("blocks.") else -1
        return (layer, 0 if (".ln_x." in name or ".gate." in name) else 1)

    return sorted(names, key=rank)  # stable: the file's order otherwise


def transform(name: str, t: torch.Tensor, spec, placement, rescale_layer: int, layer: int) -> dict[str, torch.Tensor]:
    """The package's load-time transform of one tensor (its `RWKV.__init__`, in the same op order)."""
    if rescale_layer > 0 and ("att.output.weight" in name or "ffn.value.weight" in name):
        t = t / (2 ** int(layer // rescale_layer))
    if ".time_" in name:
        t = t.squeeze()
    is_matrix = any(s in name for s in MATRIX_SUFFIXES)
    own = module_for(spec.version).pip_parameter(name.split(".", 2)[2], t, spec) if name.startswith("blocks.") \
        else None
    if own is not None:  # the version's decay and bonus
        return {name: own}
    if ".ln_x" in name:
        return {name: t.float()}
    if t.dim() == 2 and "emb" not in name and "_w1" not in name and "_w2" not in name:
        if placement.weights == "i8":
            parts = quantize_rwkv_int8(t, placement.atype)  # transposes itself; q is [in, out]
            return {name: parts["q"], name + "_mx": parts["mx"], name + "_rx": parts["rx"],
                    name + "_my": parts["my"], name + "_ry": parts["ry"]}
        t = t.t() if is_matrix else t
        return {name: t.to(dtype=DTYPES[placement.weights])}
    return {name: t.to(dtype=placement.atype)}


@dataclass(frozen=True)
class PipOptions(Options):
    strategy: str = option("cpu fp32", "the strategy the file is made for (the package loads it only with that one),"
                           ' e.g. "cuda fp16i8 *10 -> cuda fp16"')


def supports(spec: ModelSpec) -> str | None:
    if not module_for(spec.version).PIP_CONVERTED:
        return (f"the rwkv pip package cannot load converted RWKV-{spec.version} files (its loader for them reads"
                " only original checkpoints); give it the original .pth")
    return None


def write(ckpt: Checkpoint, out: Path, options: PipOptions) -> list[Path]:
    spec, tensors = ckpt.spec, ckpt.tensors
    plan = make_plan(spec, None, options.strategy)  # the package's own rescale rule (arch.rescale_interval)
    strategy, placements, rescale_layer = plan.parsed, plan.placements, plan.rescale_layer
    with torch.no_grad(), AtomicOutput(out) as target, StreamingTorchWriter(target.temp()) as writer:
        for name in _key_order(list(tensors)):
            if name.startswith("blocks.0.ln0."):
                continue
            layer = _layer_of(name, spec.n_layer)
            if name == "emb.weight":
                # The package folds ln0 in the file's own dtype (fp32 only if that fails).
                emb, w, b = tensors[name], tensors["blocks.0.ln0.weight"], tensors["blocks.0.ln0.bias"]
                try:
                    t = F.layer_norm(emb, (spec.n_embd,), weight=w, bias=b)
                except RuntimeError:
                    t = F.layer_norm(emb.float(), (spec.n_embd,), weight=w.float(), bias=b.float())
                writer.add(name, t.to(dtype=placements[0].atype))
                del t
                ckpt.release(name)
                continue
            for key, value in transform(name, tensors[name], spec, placements[layer], rescale_layer, layer).items():
                writer.add(key, value)
            ckpt.release(name)
        writer.add_value("_strategy", str(strategy))
        writer.add_value("_rescale_layer", rescale_layer)
        writer.add_value("_version", FORMAT_VERSION)
    return [out]


# ---- reading converted files ------------------------------------------------------------------------------
COMPANIONS = ("_mx", "_rx", "_my", "_ry")


def _original_shapes(tensors: dict[str, torch.Tensor], major_hint: str) -> dict[str, tuple[int, ...]]:
    """The shapes the source checkpoint had, as far as version detection and dims need them."""
    shapes: dict[str, tuple[int, ...]] = {}
    for name, t in tensors.items():
        if name.endswith(COMPANIONS):
            continue
        shape = tuple(t.shape)
        if any(name.endswith(s) for s in MATRIX_SUFFIXES):
            shape = shape[::-1]  # stored [in, out]
        elif ".time_decay" in name and "_w" not in name or ".time_first" in name or ".time_faaaa" in name:
            if len(shape) == 3 and shape[2] == 1:  # per-head, stored [H, N, 1] (v5.2, v6) or [H, 1, 1] (v5.0/5.1)
                shape = shape[:1] if shape[1] == 1 else shape[:2]  # a squeeze would lose H when it is 1
            else:
                shape = tuple(d for d in shape if d != 1) or (1,)
        shapes[name.replace(".time_first", ".time_faaaa") if major_hint == "6" else name] = shape
    c = shapes["emb.weight"][1]
    shapes["blocks.0.ln0.weight"] = shapes["blocks.0.ln0.bias"] = (c,)
    return shapes


def read_pip_converted(path: Path, tensors: dict, mmapped: bool = False, strategy: str | None = None) -> Model:
    """A Model that runs a converted file with our runner (the file's own strategy). A mapped (zip) file's tensors
    are checked against their records' CRC-32 first: the runner holds all of them, so each is read anyway."""
    file_strategy = tensors.get("_strategy")
    if strategy is not None and str(parse_strategy(strategy)) != file_strategy:
        raise RwkvConvertError(f'{path} was converted for "{file_strategy}", not "{strategy}"; load it with that'
                               " strategy or convert the original again")
    weights = {k: v for k, v in tensors.items() if isinstance(v, torch.Tensor)}
    if mmapped:
        check = ZipRecordCheck(path, weights)
        for name, t in weights.items():
            check(name, t)
    hint = detect_version({k: tuple(v.shape) for k, v in weights.items()}, str(path))
    shapes = _original_shapes(weights, hint)
    spec = build_spec(shapes, {k: str(v.dtype).removeprefix("torch.") for k, v in weights.items()}, str(path))
    module = module_for(spec.version)
    layers = []
    for i in range(spec.n_layer):
        prefix = f"blocks.{i}."
        lw: dict = {}
        for key, t in weights.items():
            if not key.startswith(prefix) or key.endswith(COMPANIONS):
                continue
            name = key[len(prefix):]
            if name in module.MATRICES:
                if t.dtype == torch.uint8:
                    lw[name] = RwkvInt8Weight(t, *(weights[key + c] for c in COMPANIONS))
                else:
                    lw[name] = FloatWeight(t.t())  # [in, out] stored: a column-major [out, in] view
            elif (own := module.from_pip(name, t, spec)) is not None:
                lw[own[0]] = own[1]
            else:
                lw[name] = t
        layers.append(passes.stack_projections(lw, module.PROJECTIONS))
    head = weights["head.weight"]
    if head.dtype == torch.uint8:
        head = RwkvInt8Weight(head, *(weights["head.weight" + c] for c in COMPANIONS))
    else:
        head = FloatWeight(head.t())
    applied = ["pip-converted file", passes.DECAY] + ([passes.STACK] if any(
        PROJECTIONS_KEY in lw for lw in layers) else [])
    plan = make_plan(spec, None, file_strategy, int(tensors.get("_rescale_layer", 0)))
    return Model(PreparedWeights(spec, plan, path, weights["emb.weight"], layers,
                                 (weights["ln_out.weight"], weights["ln_out.bias"]), head, applied))


def converted_for(probe: Probe) -> str | None:
    """The strategy a torch file was converted for by the pip package's converter (or ours), else None."""
    return probe.torch_raw[0].get("_strategy") if probe.is_torch_file else None


def client_run(path: Path, strategy: str | None, streams: dict[str, list[int]], split: int,
               spec: ModelSpec) -> ClientRun:
    """Runs the file in the rwkv pip package, with the strategy it was converted for."""
    made_for = converted_for(Probe(path))
    if strategy and str(parse_strategy(strategy)) != made_for:
        raise RwkvConvertError(f"{path} was converted for \"{made_for}\", not \"{strategy}\"; verify it with that"
                               " strategy (or convert again)")
    jobs = [{"kind": "run", "path": str(path), "strategy": made_for, "tokens": toks, "split": split}
            for toks in streams.values()]
    outputs = run_in_pip_package(jobs, v7=module_for(spec.version).PIP_V7_LOADER)
    for out in outputs:
        if "error" in out:
            raise RwkvConvertError(f"the rwkv pip package could not run {path}: {brief(out['error'], 300)}")
    schemes = {p.precision for p in make_plan(spec, None, made_for).placements}
    return ClientRun(PIP_PACKAGE.name, made_for, dict(zip(streams, outputs, strict=True)), schemes, twin=made_for)


FORMAT = Format(
    name="pip", summary="a pip-converted file (the rwkv pip package's format)", runtime="the rwkv pip package",
    sniff=lambda probe: converted_for(probe) is not None,
    load=lambda probe, strategy: read_pip_converted(probe.path, *probe.torch_raw, strategy=strategy),
    write=write, options=PipOptions, supports=supports, client_run=client_run)
