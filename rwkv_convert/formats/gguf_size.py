"""--target-size for GGUF: each large tensor's type chosen so that the file fits a size, by the measured cost
of each type on that tensor (quant.size_plan decides). `jobs` are the writer's TensorJobs (gguf_jobs.py)."""

from __future__ import annotations

import warnings

import numpy as np
import torch

from ..calibration import BUNDLED, tensor_sensitivity
from ..checkpoint import Checkpoint
from ..errors import CastWarning, RwkvConvertError
from ..progress import step
from ..quant import gguf_blocks, size_plan

PLAN_TYPES = ("q8_0", "q6_k", "q5_1", "q5_k", "q5_0", "q4_1", "q4_k", "q4_0", "q3_k", "q2_k")
PLAN_SAMPLE_ROWS = 512  # rows per tensor whose rounding error is measured for each type
GGUF_OVERHEAD = 1024  # the header, besides the vocabulary and the per-tensor infos (estimated below)


def _rows_sample(t: torch.Tensor) -> torch.Tensor:
    t = t.float().reshape(-1, t.shape[-1]) if t.dim() > 1 else t.float().reshape(1, -1)
    if t.shape[0] <= PLAN_SAMPLE_ROWS:
        return t
    return t[torch.linspace(0, t.shape[0] - 1, PLAN_SAMPLE_ROWS).long()]


def _tensor_bytes(gguf, job, qtype) -> int:
    if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        return int(np.prod(job.shape)) * (4 if qtype == gguf.GGMLQuantizationType.F32 else 2)
    return int(np.prod(gguf.quant_shape_to_byte_shape(job.shape, qtype)))


def size_budget(gguf, ckpt: Checkpoint, jobs: list, types: list, target_size: str) -> tuple[int, int]:
    """(--target-size in bytes, the bytes that do not depend on the plan), refused at once where even every
    quantizable tensor at its smallest planned type would not fit: before any calibration is run."""
    overhead = GGUF_OVERHEAD + 56 * len(jobs) + 22 * ckpt.spec.vocab_size  # measured: 11.8 kB at 100 jobs, V257
    fixed = overhead + sum(_tensor_bytes(gguf, j, t) for j, t in zip(jobs, types, strict=True) if not j.quantizable)
    f16 = fixed + sum(_tensor_bytes(gguf, j, gguf.GGMLQuantizationType.F16) for j in jobs if j.quantizable)
    budget = size_plan.parse_target(target_size, f16)
    smallest = fixed
    for job, qtype in zip(jobs, types, strict=True):
        if job.quantizable:  # its smallest planned type whose blocks divide its rows, else the type it has
            fits = [getattr(gguf.GGMLQuantizationType, n.upper()) for n in PLAN_TYPES]
            fits = [q for q in fits if job.shape[-1] % gguf.GGML_QUANT_SIZES[q][0] == 0] or [qtype]
            smallest += min(_tensor_bytes(gguf, job, q) for q in fits)
    if budget < smallest:
        raise RwkvConvertError(f"--target-size {target_size} = {budget:,} bytes is below the smallest this"
                               f" model can be ({smallest:,} bytes, {smallest / f16:.0%} of F16: every matrix at its"
                               " smallest type); give at least that")
    return budget, fixed


def plan_for_size(gguf, ckpt: Checkpoint, jobs: list, types: list, importance: dict, target_size: str,
                  calibration: str | None) -> list:
    """Each quantizable tensor's type, so that the file fits --target-size: every type's rounding error is
    measured (importance-weighted, on a sample of rows), scaled by how much that tensor alone costs the model
    (KL on the calibration text with it at q4_0, through the reference runner), and the planner steps down
    the tensors that cost the least per byte saved (quant.size_plan)."""
    def tensor_bytes(job, qtype) -> int:
        return _tensor_bytes(gguf, job, qtype)

    budget, fixed = size_budget(gguf, ckpt, jobs, types, target_size)
    errors: dict[str, dict[str, float]] = {}
    rounded_q4: dict[str, torch.Tensor] = {}
    quantizable = [j for j in jobs if j.quantizable]
    for k, job in enumerate(quantizable):
        step("--target-size: measuring each tensor's types", k, len(quantizable))
        full = job.make()
        rows = _rows_sample(full)
        weights = importance.get(job.source) if job.source else None
        w = weights.numpy() if weights is not None and weights.numel() == rows.shape[1] else None
        errors[job.name] = {}
        for name in PLAN_TYPES:
            qtype = getattr(gguf.GGMLQuantizationType, name.upper())
            block = gguf.GGML_QUANT_SIZES[qtype][0]
            if rows.shape[1] % block:
                continue
            x = rows.numpy()
            packed = gguf_blocks.quantize_any(x, name, w)
            back = gguf.quants.dequantize(packed, qtype).reshape(x.shape)
            err = ((back - x) ** 2 * (w if w is not None else 1.0)).sum() * (np.prod(job.shape[:-1]) / x.shape[0])
            errors[job.name][name] = float(err)
        if job.source and "q4_0" in errors[job.name] and full.dim() == 2:
            x = full.float().numpy()
            q4 = gguf.quants.dequantize(gguf_blocks.quantize(x, "q4_0", w), gguf.GGMLQuantizationType.Q4_0)
            rounded_q4[job.source] = torch.from_numpy(np.ascontiguousarray(q4.reshape(x.shape)))
    kl = tensor_sensitivity(ckpt, calibration or BUNDLED, rounded_q4)
    by_source = {j.source: j.name for j in jobs if j.source in kl}
    scale = {by_source[k]: v / max(errors[by_source[k]]["q4_0"], 1e-30) for k, v in kl.items()}
    typical = float(np.median(list(scale.values()))) if scale else 1.0
    candidates = {name: [size_plan.Option(t, tensor_bytes(next(j for j in jobs if j.name == name),
                                                           getattr(gguf.GGMLQuantizationType, t.upper())),
                                          e * scale.get(name, typical)) for t, e in errs.items()]
                  for name, errs in errors.items() if errs}
    chosen = size_plan.plan(candidates, fixed + sum(tensor_bytes(j, t) for j, t in zip(jobs, types, strict=True)
                                                    if j.quantizable and j.name not in candidates), budget)
    counts: dict[str, int] = {}
    for opt in chosen.values():
        counts[opt.qtype] = counts.get(opt.qtype, 0) + 1
    total = fixed + sum(o.nbytes for o in chosen.values())
    warnings.warn(f"--target-size {target_size} = {budget:,} bytes: planned {total:,} bytes with "
                  + ", ".join(f"{n} {t.upper()}" for t, n in sorted(counts.items(), key=lambda kv: -kv[1]))
                  + f"; predicted KL {sum(o.error for o in chosen.values()):.3g} (sum of each tensor's own)",
                  CastWarning, stacklevel=3)
    return [getattr(gguf.GGMLQuantizationType, chosen[j.name].qtype.upper()) if j.name in chosen else t
            for j, t in zip(jobs, types, strict=True)]
