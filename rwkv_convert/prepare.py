"""The runner's weights made from original weights for a plan: the load-time passes (passes.py) and each slot's
weight scheme (quant/), part by part. The runner prepares a whole model with it (Model), writers of prepared
files store each layer as it is made; a converted file read back is PreparedWeights."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from . import arch, passes
from .arch.common import PROJECTIONS_KEY, as_vector
from .errors import RwkvConvertError
from .plan import Plan
from .quant import scheme_for
from .spec import ModelSpec
from .strategy import Placement

LN0_FOLDS = ("fp32", "package")


@dataclass
class PreparedWeights:
    """Weights as the runner holds them, with the plan they were prepared for (a converted file read back)."""
    spec: ModelSpec
    plan: Plan
    source: Any  # where they came from (a path), for messages
    emb: torch.Tensor
    layers: list[dict]
    ln_out: tuple
    head: Any
    passes: list[str]  # the passes the weights went through
    ln0: tuple | None = None  # ln0 left to the runner (None: folded into emb)


class Preparation:
    """Prepares original weights for `plan`. quantizer: None, or a function (our key, the matrix as prepared
    [out, in], its Placement) -> the weight to use instead of the slot's scheme's, or None to leave the matrix to
    the scheme. skip_passes: optional passes to leave out (passes.FOLD_LN0, passes.STACK), for comparisons.
    ln0_fold: "fp32" (ours) or "package" (as the pip package folds it). After prepared_parts: passes, ln0, emb,
    ln_out, head."""

    def __init__(self, spec: ModelSpec, plan: Plan, quantizer: Callable | None = None,
                 skip_passes: tuple[str, ...] = (), ln0_fold: str = "fp32", ln0_per_token: bool = False):
        if ln0_fold not in LN0_FOLDS:
            raise RwkvConvertError(f"unknown ln0 fold {ln0_fold!r}; choose from {', '.join(LN0_FOLDS)}")
        unknown = set(skip_passes) - {passes.FOLD_LN0, passes.STACK}
        if unknown:
            raise ValueError(f"cannot skip {sorted(unknown)}: only {passes.FOLD_LN0} and {passes.STACK} are optional")
        self.spec, self.plan, self.strategy = spec, plan, plan.parsed
        self.placements: list[Placement] = plan.placements
        self.rescale_layer = plan.rescale_layer
        self.module = arch.module_for(spec.version)
        self._tables = arch.token_tables(spec)
        self._skip, self._ln0_fold, self._quantizer = set(skip_passes), ln0_fold, quantizer
        # ln0_per_token: a runner on the CPU folds ln0 into each token's row as it reads it (the table stays as
        # stored); files made for a runtime fold the table itself
        self._ln0_per_token = ln0_per_token

    def _quantize(self, key: str, weight: torch.Tensor, placement: Placement):
        chosen = self._quantizer(key, weight, placement) if self._quantizer is not None else None
        return chosen if chosen is not None else scheme_for(placement.weights).quantize(weight, placement.atype)

    def prepared_parts(self, tensors: dict[str, torch.Tensor]):
        """Prepare the weights part by part: sets self.passes, self.ln0, self.emb, self.ln_out, self.head and
        yields (i, layer i's weights) for each layer, then (n_layer, {}) once the head is ready. Writers of
        prepared files consume it one layer at a time."""
        spec, module, skip = self.spec, self.module, self._skip
        first, head = self.placements[0], self.placements[spec.n_layer]
        self.passes: list[str] = []

        def record(name: str) -> None:
            if name not in self.passes:
                self.passes.append(name)

        def ran(name: str) -> bool:
            if name in skip:
                return False
            record(name)
            return True

        with torch.no_grad():
            # ln0 is folded into the embedding table in fp32 (the pip package does it in the file's dtype
            # for v4-v6, so bf16 files give it a bf16-rounded table; see docs/numerics.md). A model run on the
            # CPU applies the same fp32 fold to each token's row as it is read instead: the table stays as
            # stored, memory-mapped, and is never copied (a 65536x768 bf16 table would take 201 MB as fp32).
            self.ln0 = None
            if self._ln0_per_token and passes.FOLD_LN0 not in skip:
                record(passes.FOLD_LN0)
                self.ln0 = tuple(tensors[f"blocks.0.ln0.{n}"].float() for n in ("weight", "bias"))
                self.emb = tensors["emb.weight"]
            else:
                if ran(passes.FOLD_LN0):
                    fold_dtype = torch.float32
                    if self._ln0_fold == "package":
                        fold_dtype = tensors["emb.weight"].dtype if module.PIP_LN0_FOLD == "file" else first.atype
                    tensors = passes.fold_ln0(tensors, fold_dtype)
                else:
                    self.ln0 = tuple(tensors[f"blocks.0.ln0.{n}"].to(first.atype).to(first.device)
                                     for n in ("weight", "bias"))
                self.emb = tensors["emb.weight"].to(first.atype).to(first.device)
            for i in range(spec.n_layer):
                p = self.placements[i]
                prefix = f"blocks.{i}."
                lw = {k[len(prefix):]: v for k, v in tensors.items()
                      if k.startswith(prefix) and not k.startswith(prefix + "ln0.")}
                for name, t in lw.items():
                    if name in self._tables:
                        continue  # kept as stored: rows are read per token (arch.v7.token_rows)
                    if name not in module.MATRICES:
                        dtype = torch.float32 if name in module.FP32_PARAMS else p.atype
                        lw[name] = as_vector(t).to(dtype)
                if self.rescale_layer:
                    record(passes.RESCALE)
                    lw = passes.rescale_for_fp16(lw, i, self.rescale_layer)
                for name in module.MATRICES:
                    if name in lw:
                        lw[name] = self._quantize(prefix + name, lw[name], p)
                record(passes.DECAY)  # the runner's math expects it: it always runs
                lw = passes.precompute_decay(lw, module, spec, i)
                if passes.STACK not in skip:
                    lw = passes.stack_projections(lw, module.PROJECTIONS)
                    if PROJECTIONS_KEY in lw:  # float layers only
                        record(passes.STACK)
                yield i, lw
            self.ln_out = (tensors["ln_out.weight"].to(head.atype).to(head.device),
                           tensors["ln_out.bias"].to(head.atype).to(head.device))
            self.head = self._quantize("head.weight", tensors["head.weight"], head).to(head.device)
            yield spec.n_layer, {}
