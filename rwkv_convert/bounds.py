"""The bounds a verdict is judged by: the precision table's bound for the candidate's least precise storage type,
widened to what that type's own rounding does to this model (SCHEME_NOISE), and the shares of the noise baseline
any honest file must beat (docs/verification.md)."""

from __future__ import annotations

import torch

from .metrics import Metrics
from .precision import BOUND_ORDER, BOUNDS, Bound, float_bound, least_precise

# A verdict's bound is the precision table's (precision.py: one row per storage type, one bound per class)
Tolerance = Bound

TOLERANCES = BOUNDS

# How the reference runner reproduces each scheme's rounding on the reference checkpoint itself, and how far
# beyond that run's error a valid candidate may go. A strategy of ours is the pip package's own math for that
# scheme (the same rounding, so a faithful candidate's error is about the same: factor 2); "blocksN" rounds
# every matrix to symmetric N-bit blocks of 32 and runs in fp32, which leaves out what the client adds
# (llama.cpp and onnxruntime also quantize activations: factor 4). What that run differs from the fp32
# reference by is the error the scheme itself causes on this model. Random-weight models of other sizes amplify
# rounding 3-7x more or less than the 7-layer fixtures the table above was measured on, trained models
# differently again: the table alone, calibrated at one size, is a false alarm at another (docs/verification.md).
# max |Δ|, the tail of the error, takes twice the factor: measured, llama.cpp's Q8_0 activations take a random
# 12-layer model's max |Δ| to 5.7x the weights-only run's while its rel L2 grows 2.9x.
SCHEME_NOISE = {"fp16": ("cpu fp16", 2.0), "bf16": ("cpu bf16", 2.0), "i8": ("cpu fp32i8", 2.0),
                "bf16i8": ("cpu bf16i8", 2.0), "q8_0": ("blocks8", 4.0), "int8-block": ("blocks8", 4.0),
                "int4-block": ("blocks4", 4.0), "q5/q4": ("blocks4", 4.0), "q3/q2": ("blocks3", 4.0)}

# Every verdict is also judged against a model that knows nothing of the input: the reference's own logits at
# other positions (each stream rolled by half its length: plausible distributions, about other tokens). A model of
# noise scores about what that baseline scores; an honest file, however coarse, a small part of it. Measured
# (2026-12-07) on the 7-layer v5.2 and v6 fixtures and the trained models, GGUF q8_0 to q4_0 and prepared i8/bf16:
# noise copies at KL 1.05-1.08x and relative L2 1.04x the baseline's, with 0% top-1 on all positions; honest files
# at KL <= 0.05x and relative L2 <= 0.23x, top-1 >= 53% (Q2_K of the trained v7: rel L2 0.4x). The shares below
# leave about 4-5x room on both sides for KL, 2x for L2; tests/test_noise_copies.py holds one case per scheme.
NOISE_BASELINE = {"kl": 0.25, "rel_l2": 0.5, "top1": 0.25}  # top1: of the way from the baseline's share to 100%

GREEDY_EXACT = ("fp32", "fp16")  # schemes whose files must generate the reference's greedy tokens (near ties aside)

BASELINE_NEEDS_KL = 1e-3  # a reference whose positions barely differ gives no baseline to judge against


def scheme_label(placement) -> str:
    return placement.precision


def stored_precision(spec) -> str:
    """The least precise float type a model file stores its weights in (fp32, fp16 or bf16)."""
    return max((float_bound(d) for d, n in spec.dtypes.items() if n and d.startswith(("float", "bfloat"))),
               key=BOUND_ORDER.index, default="fp32")


def tolerance_for(schemes: set[str]) -> tuple[str, Tolerance]:
    return least_precise(schemes)


def round_to_blocks(weight: torch.Tensor, bits: int, block: int = 32) -> torch.Tensor:
    """A matrix as symmetric absmax blocks of `block` values along its rows store it (GGUF Q8_0 / Q4_0-like):
    the rounding a block-quantized export applies, back in fp32."""
    rows, cols = weight.shape
    if cols % block:
        return weight
    w = weight.float().reshape(rows, cols // block, block)
    levels = 2 ** (bits - 1) - 1
    scale = (w.abs().amax(-1, keepdim=True) / levels).clamp_min(1e-30)
    return ((w / scale).round().clamp(-levels - 1, levels) * scale).reshape(rows, cols)


def calibrated(scheme: str, noise: Metrics | None) -> Tolerance:
    """The scheme's table bound, widened to the scheme's factor (SCHEME_NOISE) times its measured error on this
    model where that is larger (KL, a square of the error, by the factor squared; max |Δ| by twice the factor)."""
    tol = TOLERANCES[scheme]
    if noise is None:
        return tol
    k = SCHEME_NOISE[scheme][1]
    bounds = (max(tol.max_abs, 2 * k * noise.max_abs), max(tol.rel_l2, k * noise.rel_l2), max(tol.kl, k * k * noise.kl),
              tol.top1)  # top-1 is judged where the reference is confident beyond max |Δ|: no widening needed
    if bounds == (tol.max_abs, tol.rel_l2, tol.kl, tol.top1):
        return tol
    measured = (f"this model in {scheme} by the reference runner: max |Δ| {noise.max_abs:.3g}, rel L2"
                f" {noise.rel_l2:.3g}, KL {noise.kl:.3g}")
    return Tolerance(*bounds, f"{k:g}x the scheme's own error on {measured}; table: {tol.reason}")
