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


def _planned(job, plan_small: bool) -> bool:
    return job.quantizable or (job.lora and plan_small)


def _candidate_types(gguf, job) -> list[str]:
    """The types --target-size may give the tensor: PLAN_TYPES whose blocks divide its rows; a LoRA factor may
    also stay F32 (as llama-quantize keeps it) or go to F16."""
    fits = [n for n in PLAN_TYPES
            if job.shape[-1] % gguf.GGML_QUANT_SIZES[getattr(gguf.GGMLQuantizationType, n.upper())][0] == 0]
    return (["f32", "f16"] if job.lora else []) + fits


def size_budget(gguf, ckpt: Checkpoint, jobs: list, types: list, target_size: str,
                plan_small: bool = True) -> tuple[int, int]:
    """(--target-size in bytes, the bytes that do not depend on the plan), refused at once where even every
    planned tensor at its smallest type would not fit: before any calibration is run."""
    overhead = GGUF_OVERHEAD + 56 * len(jobs) + 22 * ckpt.spec.vocab_size  # measured: 11.8 kB at 100 jobs, V257
    fixed = overhead + sum(_tensor_bytes(gguf, j, t) for j, t in zip(jobs, types, strict=True)
                           if not _planned(j, plan_small))
    f16 = fixed + sum(_tensor_bytes(gguf, j, gguf.GGMLQuantizationType.F16 if j.quantizable else t)
                      for j, t in zip(jobs, types, strict=True) if _planned(j, plan_small))
    budget = size_plan.parse_target(target_size, f16)
    smallest = fixed
    for job, qtype in zip(jobs, types, strict=True):
        if _planned(job, plan_small):  # its smallest candidate type, else the type it has
            fits = [getattr(gguf.GGMLQuantizationType, n.upper()) for n in _candidate_types(gguf, job)] or [qtype]
            smallest += min(_tensor_bytes(gguf, job, q) for q in fits)
    if budget < smallest:
        raise RwkvConvertError(f"--target-size {target_size} = {budget:,} bytes is below the smallest this"
                               f" model can be ({smallest:,} bytes, {smallest / f16:.0%} of F16: every matrix at its"
                               " smallest type); give at least that")
    return budget, fixed


def _rounded(gguf, x: np.ndarray, name: str, w: np.ndarray | None) -> np.ndarray:
    if name == "f32":
        return x
    if name == "f16":
        return x.astype(np.float16).astype(np.float32)
    packed = gguf_blocks.quantize_any(x, name, w)
    return gguf.quants.dequantize(packed, getattr(gguf.GGMLQuantizationType, name.upper())).reshape(x.shape)


def plan_for_size(gguf, ckpt: Checkpoint, jobs: list, types: list, importance: dict, target_size: str,
                  calibration: str | None, plan_small: bool = True) -> list:
    """Each planned tensor's type (the large matrices, and the LoRA factors), so that the file fits
    --target-size: every type's rounding error is measured (importance-weighted, on a sample of rows), scaled by
    how much that tensor alone costs the model (KL on the calibration text with it at q4_0, through the
    reference runner), and the planner steps down the tensors that cost the least per byte saved
    (quant.size_plan). plan_small: the LoRA factors are planned too (else they stay as `types` has them)."""
    budget, fixed = size_budget(gguf, ckpt, jobs, types, target_size, plan_small)
    errors: dict[str, dict[str, float]] = {}
    rounded_q4: dict[str, torch.Tensor] = {}
    key_of: dict[str, str] = {}  # our key -> the file's tensor it is measured as
    planned = [j for j in jobs if _planned(j, plan_small)]
    for k, job in enumerate(planned):
        step("--target-size: measuring each tensor's types", k, len(planned))
        full = job.make().float()
        rows = _rows_sample(full)
        weights = importance.get(job.source) if job.source else None
        w = weights.numpy() if weights is not None and weights.numel() == rows.shape[1] else None
        x = rows.numpy()
        scale_rows = int(np.prod(job.shape[:-1])) / x.shape[0]
        errors[job.name] = {name: float(((_rounded(gguf, x, name, w) - x) ** 2 * (w if w is not None else 1.0)).sum()
                                        * scale_rows) for name in _candidate_types(gguf, job)}
        ours = (job.source if full.dim() == 2 else None) or job.factor  # the key tensor_sensitivity replaces
        if ours and "q4_0" in errors[job.name]:
            whole = full.reshape(-1, full.shape[-1]).numpy()
            q4 = torch.from_numpy(np.ascontiguousarray(_rounded(gguf, whole, "q4_0", w))).reshape(full.shape)
            rounded_q4[ours], key_of[ours] = (job.as_ours(q4) if job.factor else q4), job.name
    kl = tensor_sensitivity(ckpt, calibration or BUNDLED, rounded_q4)
    scale = {key_of[k]: v / max(errors[key_of[k]]["q4_0"], 1e-30) for k, v in kl.items()}
    typical = float(np.median(list(scale.values()))) if scale else 1.0
    by_name = {j.name: j for j in jobs}
    candidates = {name: [size_plan.Option(t, _tensor_bytes(gguf, by_name[name],
                                                           getattr(gguf.GGMLQuantizationType, t.upper())),
                                          e * scale.get(name, typical)) for t, e in errs.items()]
                  for name, errs in errors.items() if errs}
    chosen = size_plan.plan(candidates, fixed + sum(_tensor_bytes(gguf, j, t) for j, t in zip(jobs, types, strict=True)
                                                    if _planned(j, plan_small) and j.name not in candidates), budget)
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
