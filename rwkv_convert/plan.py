"""A strategy applied to a checkpoint: each slot's device, activation dtype, weight scheme, whether it is
streamed, the fp16 rescale, and the bytes each device holds. Computed from tensor shapes alone (nothing is
loaded). The runner executes the plan it is given (its placements and rescale): `plan` prints the same object."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from . import arch, passes
from .strategy import Placement, Strategy, allocate, parse_strategy
from .units import human_size

_BYTES = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}
_WEIGHT_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


@dataclass
class SlotPlan:
    slot: str  # "0".."L-1" or "head"
    device: str
    activations: str
    weights: str
    streamed: bool
    bytes: int


@dataclass
class Plan:
    strategy: str
    n_layer: int
    rescale_layer: int
    slots: list[SlotPlan]
    passes: list[str] = field(default_factory=list)  # load-time passes the runner applies (rwkv_convert.passes)
    device_bytes: dict[str, int] = field(default_factory=dict)  # resident on each device
    notes: list[str] = field(default_factory=list)
    # what the runner executes: the parsed strategy and each slot's Placement (strategy.allocate)
    parsed: Strategy | None = field(default=None, repr=False)
    placements: list[Placement] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        out = asdict(self)
        del out["parsed"], out["placements"]
        return out


def _matrix_bytes(shape, weights: str, atype: torch.dtype, held_as_bf16: bool) -> int:
    n = shape[0] * shape[1]
    if weights == "i8":  # q plus mx, rx (out) and my, ry (in) in the activation dtype
        return n + 2 * (shape[0] + shape[1]) * _BYTES[atype]
    return n * (2 if held_as_bf16 else _WEIGHT_BYTES[weights])


def bf16_file(spec) -> bool:
    """Every tensor of the file is bf16: the CPU runner holds its fp32 matrices as bf16 rows (exact)."""
    return set(spec.dtypes) == {"bfloat16"}


def make_plan(spec, shapes: dict[str, tuple[int, ...]] | None, strategy: str | Strategy,
              rescale_layer: int | None = None) -> Plan:
    """The plan of `strategy` on a model; shapes None (weights already prepared, as a converted file holds them):
    no byte counts. rescale_layer: the fp16 rescale a file was made with, instead of the strategy's."""
    strategy = strategy if isinstance(strategy, Strategy) else parse_strategy(strategy)
    placements = allocate(strategy, spec.n_layer)
    module = arch.module_for(spec.version)
    rescale = arch.rescale_interval(spec, strategy) if rescale_layer is None else rescale_layer
    rescale = rescale if module.FP16_RESCALE else 0
    tables = arch.token_tables(spec)
    plan = Plan(str(strategy), spec.n_layer, rescale, [], parsed=strategy, placements=placements)
    if shapes is None:
        return plan

    def held_as_bf16(p) -> bool:  # the runner's Bf16RowsWeight (rwkv_convert.quant.float_weights.held_for_cpu)
        return p.weights in ("fp32", "bf16") and (p.weights == "bf16" or bf16_file(spec)) and (
            p.device == "cpu" or p.stream)

    plan.passes = [passes.FOLD_LN0] + ([passes.RESCALE] if rescale else []) + [passes.DECAY]
    if any(p.weights != "i8" for p in placements[:-1]):
        plan.passes.append(passes.STACK)
    for slot, p in enumerate(placements):
        if slot < spec.n_layer:
            prefix = f"blocks.{slot}."
            names = {k[len(prefix):]: s for k, s in shapes.items() if k.startswith(prefix) and ".ln0." not in k}
            if slot == 0:
                names["emb.weight"] = shapes["emb.weight"]
        else:
            names = {"ln_out.weight": shapes["ln_out.weight"], "ln_out.bias": shapes["ln_out.bias"],
                     "head.weight": shapes["head.weight"]}
        resident = streamed = 0
        for name, shape in names.items():
            if name in tables:  # memory-mapped from the file: only the rows of the tokens seen are read
                continue
            if name in module.MATRICES or name == "head.weight":
                size = _matrix_bytes(shape, p.weights, p.atype, held_as_bf16=held_as_bf16(p))
                if p.stream:
                    streamed += size
                    continue
            else:
                numel = 1
                for d in shape:
                    numel *= d
                size = numel * (4 if name in module.FP32_PARAMS else _BYTES[p.atype])
            resident += size
        plan.device_bytes[p.device] = plan.device_bytes.get(p.device, 0) + resident
        if streamed:
            plan.device_bytes["cpu (pinned, streamed)"] = plan.device_bytes.get("cpu (pinned, streamed)", 0) + streamed
        plan.slots.append(SlotPlan("head" if slot == spec.n_layer else str(slot), p.device,
                                   str(p.atype).removeprefix("torch."), p.weights, p.stream, resident + streamed))
    if any(p.weights == "fp32" and held_as_bf16(p) for p in placements):
        plan.notes.append("fp32 matrices of this bf16 file are held as bf16 in CPU memory (widening is exact) and"
                          " computed in fp32: the same numbers from half the memory")
    if tables:
        plan.notes.append(f"per-token tables ({', '.join(tables)}): {spec.table_params:,} parameters stay"
                          " memory-mapped in the file and are not counted above; a token reads one row of each")
    used = {p.segment for p in placements}
    for i, seg in enumerate(strategy.segments):
        if i not in used and seg.count != 0:
            plan.notes.append(f'segment "{seg}" gets no layers'
                              f" (the earlier segments take all {spec.n_layer + 1} slots)")
    if rescale:
        plan.notes.append(f"fp16 rescale: x is halved after every {rescale} layers (as the rwkv pip package does)")
    return plan


def format_plan(plan: Plan) -> str:
    lines = [f"strategy  {plan.strategy}   ({plan.n_layer} layers + head)", "",
             f"{'slot':<6}{'device':<10}{'activations':<13}{'weights':<9}{'streamed':<10}{'size':>10}"]
    for s in plan.slots:
        lines.append(f"{s.slot:<6}{s.device:<10}{s.activations:<13}{s.weights:<9}{'yes' if s.streamed else '':<10}"
                     f"{human_size(s.bytes):>10}")
    lines.append("")
    lines.append(f"passes: {', '.join(plan.passes)}")
    lines += [f"{device}: {human_size(n)}" for device, n in plan.device_bytes.items()]
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)
