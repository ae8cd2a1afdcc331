"""How far a candidate's logits are from the reference's: max |Δ|, relative L2, KL, top-1 (all positions and
where the reference is confident), the state difference, greedy agreement, and the noise baseline a verdict is
judged against (the reference's own logits at other positions)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Metrics:
    max_abs: float
    rel_l2: float
    kl: float
    top1: float  # in a report: over the positions the reference is confident in (confident_top1)
    state_max_abs: float | None
    top1_positions: int | None = None  # how many positions top-1 was judged on
    top1_all: float | None = None  # top-1 agreement over every position (judged against the noise baseline)
    greedy: int | None = None  # greedy tokens the candidate generates as the reference does, from the prompt on
    greedy_of: int | None = None  # of how many (the fixed stream's continuation)
    greedy_misses: int | None = None  # of those, where the reference's lead beats the max |Δ| bound yet differs


def greedy_agreement(ref: torch.Tensor, cand: torch.Tensor, start: int, margin: float) -> tuple[int, int, int]:
    """On a stream whose tokens from `start` on are the reference's greedy choices: (how many of them the candidate
    generates as the reference does before it first differs, how many there are, at how many positions it picks
    another token where the reference's best logit leads by more than `margin`)."""
    picks = range(start - 1, ref.shape[0] - 1)  # the logits at p choose token p + 1
    same = [int(ref[p].argmax()) == int(cand[p].argmax()) for p in picks]
    leading = next((k for k, ok in enumerate(same) if not ok), len(same))
    best = ref.double().topk(2, dim=-1).values
    misses = sum(1 for p, ok in zip(picks, same, strict=True) if not ok and best[p, 0] - best[p, 1] > margin)
    return leading, len(same), misses


def noise_baseline(ref_logits: torch.Tensor) -> Metrics:
    """What a model unrelated to the input scores against the reference on this stream: the reference's own
    logits rolled by half the stream (every position), over all positions."""
    rolled = ref_logits.roll(max(ref_logits.shape[0] // 2, 1), 0)
    max_abs, rel_l2, kl, top1 = compare(ref_logits, rolled)
    return Metrics(max_abs, rel_l2, kl, top1, None, ref_logits.shape[0])


def compare(ref: torch.Tensor, cand: torch.Tensor) -> tuple[float, float, float, float]:
    ref, cand = ref.double(), cand.double()
    diff = cand - ref
    max_abs = diff.abs().max().item()
    rel_l2 = (diff.norm() / ref.norm().clamp_min(1e-30)).item()
    log_p, log_q = torch.log_softmax(ref, -1), torch.log_softmax(cand, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean().item()
    top1 = (ref.argmax(-1) == cand.argmax(-1)).double().mean().item()
    return max_abs, rel_l2, max(kl, 0.0), top1


def confident_top1(ref: torch.Tensor, cand: torch.Tensor, margin: float) -> tuple[float, int]:
    """(top-1 agreement, positions judged) over the positions where the reference's best logit leads the
    second by more than `margin` (the max |Δ| bound): elsewhere a within-bound error may flip a near tie, which
    says nothing about the candidate (random-weight models are mostly near ties, trained ones rarely)."""
    best = ref.double().topk(2, dim=-1).values
    confident = (best[..., 0] - best[..., 1]) > margin
    n = int(confident.sum())
    if n == 0:
        return 1.0, 0
    return (ref.argmax(-1) == cand.argmax(-1))[confident].double().mean().item(), n


def state_difference(ref: list, cand: list) -> float | None:
    if not cand or len(ref) != len(cand):
        return None
    worst = 0.0
    for a, b in zip(ref, cand, strict=True):
        a, b = a.double(), b.double().to(a.device)
        if a.shape != b.shape:
            return None
        finite = a.abs() < 1e29  # v4's pp starts at -1e30
        worst = max(worst, (a - b)[finite].abs().max().item() if finite.any() else 0.0)
    return worst
