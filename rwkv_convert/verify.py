"""Verification: the same token streams through a reference runner and a candidate's runner, in
sequence mode, token by token, and in two chunks with the state carried; metrics and one tolerance table.

Three parts: `reference_run` (our runner at `cpu fp32` on the source checkpoint), `candidate_run` (the
candidate in the runtime its format's registry entry names: llama.cpp for GGUF, the `rwkv` pip package for
its converted files, onnxruntime for ONNX; or our reader with --runner ours), and `score` (metrics against
the tolerance of the candidate's least precise weights)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .adapters import AdapterRef
from .arch import module_for
from .bounds import (
    BASELINE_NEEDS_KL,
    GREEDY_EXACT,
    NOISE_BASELINE,
    SCHEME_NOISE,
    Tolerance,
    calibrated,
    round_to_blocks,
    stored_precision,
    tolerance_for,
)
from .checkpoint import Checkpoint, checkpoint_from_tensors
from .errors import RwkvConvertError
from .formats.registry import detect, load_detected, read_checkpoint
from .metrics import Metrics, compare, confident_top1, greedy_agreement, noise_baseline, state_difference
from .plan import make_plan
from .precision import BOUND_ORDER
from .progress import step
from .runner import Model
from .runtimes.base import ClientFailed, ClientRun, NoClient, runner_named
from .runtimes.hf_transformers import trusting_remote_code
from .runtimes.ours import run_ours
from .spec import ModelSpec
from .strategy import parse_strategy
from .tokenizer import BYTE_TOKENS, WORLD_TOKENS, WorldTokenizer
from .units import check_memory

MODES = ("sequence", "one-token", "chunked")
_MODE_KEYS = {"sequence": "seq", "one-token": "one", "chunked": "split"}


def scheme_noise(ref: ReferenceRun, scheme: str) -> Metrics | None:
    """The scheme's own error on this model: the reference checkpoint run with the scheme's rounding (see
    SCHEME_NOISE), compared with the fp32 reference in sequence mode, worst over the streams. None: no scheme
    rounding to measure (fp32), or one whose outputs are not judged by comparison (q5/q4)."""
    if scheme not in SCHEME_NOISE:
        return None
    how = SCHEME_NOISE[scheme][0]
    if how.startswith("blocks"):
        bits = int(how.removeprefix("blocks"))
        matrices = {f"blocks.{i}.{m}" for i in range(ref.spec.n_layer) for m in module_for(ref.spec.version).MATRICES}
        rounded = {k: round_to_blocks(v, bits) if k in matrices | {"emb.weight", "head.weight"} else v
                   for k, v in ref.ckpt.tensors.items()}
        model = Model(checkpoint_from_tensors(ref.ckpt.path, rounded, mmapped=False), "cpu fp32")
        logits = {name: model.forward(tokens, full_output=True)[0] for name, tokens in ref.streams.items()}
    else:
        logits = strategy_logits(ref, how)
    worst = Metrics(0.0, 0.0, 0.0, 1.0, None)
    for name in ref.streams:
        max_abs, rel_l2, kl, top1 = compare(ref.outputs[name]["seq"], logits[name])
        worst = Metrics(max(worst.max_abs, max_abs), max(worst.rel_l2, rel_l2), max(worst.kl, kl),
                        min(worst.top1, top1), None)
    return worst


@dataclass
class VerifyReport:
    candidate: str
    reference: str
    runner: str
    scheme: str
    tolerance: Tolerance
    tokens: int
    rows: dict[str, Metrics] = field(default_factory=dict)  # "stream/mode" -> metrics
    twin: dict[str, Metrics] = field(default_factory=dict)  # stream -> against the same strategy (TWIN), if run
    baseline: dict[str, Metrics] = field(default_factory=dict)  # stream -> the noise baseline (noise_baseline)
    passed: bool = True
    worst: str = ""  # the metric furthest beyond (or closest to) its bound, "stream/mode metric"
    ln0_fold: str = "fp32"  # how the reference runner folded ln0
    note: str = ""  # why the file's own client did not run it (ClientRun.note): said in the verdict line
    adapters: list[dict] = field(default_factory=list)  # adapters merged into the reference (AppliedAdapter)

    def to_dict(self) -> dict:
        return asdict(self)


def verdict_checks(report: VerifyReport) -> list[tuple[str, str, str, float]]:
    """Every figure a verdict judges: (stream/mode, metric, "value > bound" text, value / bound; above 1 fails).
    Against the scheme's tolerance; top-1 only where it had positions to judge; against the stream's noise
    baseline (unless the reference's positions barely differ); against the same strategy (twin), if run."""
    tol, checks = report.tolerance, []
    for row, m in report.rows.items():
        checks += [(row, "max |Δlogit|", f"max |Δlogit| {m.max_abs:.3g} > {tol.max_abs:.3g}", m.max_abs / tol.max_abs),
                   (row, "relative L2", f"relative L2 {m.rel_l2:.3g} > {tol.rel_l2:.3g}", m.rel_l2 / tol.rel_l2),
                   (row, "KL", f"KL {m.kl:.3g} > {tol.kl:.3g}", m.kl / tol.kl)]
        if m.top1_positions:  # a share of no positions says nothing: it neither passes nor fails a verdict
            checks.append((row, "top-1 agreement", f"top-1 {m.top1:.1%} < {tol.top1:.1%}",
                           (1 - m.top1) / max(1 - tol.top1, 1e-9)))
        if report.scheme in GREEDY_EXACT and m.greedy_misses:  # fp32/fp16: the same tokens, near ties aside
            checks.append((row, "greedy agreement", f"greedy {m.greedy}/{m.greedy_of} ({m.greedy_misses} tokens"
                           " differ where the reference's lead beats the max |Δ| bound)", 1.0 + m.greedy_misses))
        base = report.baseline.get(row.split("/")[0])
        if base is None or base.kl < BASELINE_NEEDS_KL or m.top1_all is None:
            continue
        kl_bound, l2_bound = NOISE_BASELINE["kl"] * base.kl, NOISE_BASELINE["rel_l2"] * base.rel_l2
        top1_need = base.top1 + NOISE_BASELINE["top1"] * (1 - base.top1)
        checks += [(row, "KL against the noise baseline", f"KL {m.kl:.3g} > {kl_bound:.3g} ({NOISE_BASELINE['kl']:g}x"
                    f" the noise baseline's)", m.kl / kl_bound),
                   (row, "relative L2 against the noise baseline", f"relative L2 {m.rel_l2:.3g} > {l2_bound:.3g}"
                    f" ({NOISE_BASELINE['rel_l2']:g}x the noise baseline's)", m.rel_l2 / l2_bound),
                   (row, "top-1 of all positions against the noise baseline", f"top-1 of all positions"
                    f" {m.top1_all:.1%} < {top1_need:.1%} (the noise baseline has {base.top1:.1%})",
                    (1 - m.top1_all) / max(1 - top1_need, 1e-9))]
    for stream, m in report.twin.items():
        checks += [(f"{stream}/sequence", "relative L2 vs the same strategy",
                    f"relative L2 vs the same strategy {m.rel_l2:.3g} > {TWIN.rel_l2:.3g}", m.rel_l2 / TWIN.rel_l2),
                   (f"{stream}/sequence", "KL vs the same strategy", f"KL vs the same strategy {m.kl:.3g} >"
                    f" {TWIN.kl:.3g}", m.kl / TWIN.kl)]
    return checks


def token_streams(vocab: int, n: int, seed: int) -> dict[str, list[int]]:
    text = ("RWKV is an RNN with transformer-level performance. It can be directly trained like a GPT "
            "(parallelizable). 你好，世界！ 1234567890 ") * 8
    # the text as the model's own vocabulary has it (World, or bytes below its size)
    fixed = WorldTokenizer(vocab_size=None if vocab >= WORLD_TOKENS else min(vocab, BYTE_TOKENS)).encode(text)[:n]
    fixed = (fixed * (n // max(len(fixed), 1) + 1))[:n]
    gen = torch.Generator().manual_seed(seed)
    return {"fixed": fixed, "random": torch.randint(0, vocab, (n,), generator=gen).tolist()}


def _check_same_model(model, candidate, spec, reference) -> None:
    if (model.spec.vocab_size, model.spec.n_embd) != (spec.vocab_size, spec.n_embd):
        raise RwkvConvertError(f"{candidate} (vocab {model.spec.vocab_size}, n_embd {model.spec.n_embd}) is not"
                               f" a conversion of {reference} (vocab {spec.vocab_size}, n_embd {spec.n_embd})")


@dataclass
class ReferenceRun:
    spec: ModelSpec
    streams: dict[str, list[int]]
    split: int
    outputs: dict[str, dict]
    ckpt: Checkpoint | None = None  # what the scheme's own error is measured on (scheme_noise)
    strategy_runs: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # strategy_logits' cache
    ln0_fold: str = "fp32"  # the runner's ln0 fold, for every run of the reference
    state: str | Path | None = None  # the state file applied to the reference (and to original-weight candidates)
    greedy_from: int | None = None  # where the fixed stream becomes the reference's greedy continuation


def reference_run(reference: str | Path, tokens: int = 64, seed: int = 0, ln0_fold: str = "fp32",
                  state: str | Path | None = None, adapters: Sequence[AdapterRef] = ()) -> ReferenceRun:
    """The source checkpoint (with `adapters` merged and the state file `state` applied, if given: the same
    merge a conversion does) through our runner at cpu fp32, on a
    fixed and a random stream. ln0_fold "package": ln0 folded as the pip package does (its dtype, not fp32), to
    compare with it bit for bit."""
    if tokens < 2:
        raise RwkvConvertError("--tokens must be at least 2 (the chunked mode splits the stream)")
    ckpt = read_checkpoint(reference, state, adapters)
    # every run keeps both streams' logits in three modes: the reference's, the candidate's and one more (the
    # twin or the scheme's own run), all fp32 [tokens, vocab]; checked before any of it is allocated
    logits = 2 * 3 * 3 * tokens * ckpt.spec.vocab_size * 4
    weights = sum(make_plan(ckpt.spec, ckpt.shapes, "cpu fp32").device_bytes.values())
    check_memory(logits + 2 * weights, f"verifying {reference} with --tokens {tokens}",
                 "use fewer --tokens (the default is 64) or a machine with more memory")
    model = Model(ckpt, "cpu fp32", ln0_fold=ln0_fold)
    streams = token_streams(ckpt.spec.vocab_size, tokens, seed)
    # the fixed stream's second half is the reference's own greedy continuation of its first half: a candidate
    # that agrees with the reference's argmax there generates what the reference generates (greedy_agreement)
    prompt = streams["fixed"][:tokens - tokens // 2]
    streams["fixed"] = prompt + greedy_continuation(model, prompt, tokens // 2)
    split = max(1, tokens // 3)
    outputs = {}
    for k, (name, stream) in enumerate(streams.items()):
        step("verify: running the reference", k, len(streams))
        outputs[name] = run_ours(model, stream, split)
    step("verify: running the reference", len(streams), len(streams))
    return ReferenceRun(ckpt.spec, streams, split, outputs, ckpt, ln0_fold=ln0_fold, state=state,
                        greedy_from=len(prompt))


def greedy_continuation(model, prompt: list[int], n: int) -> list[int]:
    """The n tokens the model generates after `prompt`, each its argmax (one token at a time, as a client would)."""
    tokens: list[int] = []
    logits, state = model.forward(prompt)
    for _ in range(n):
        tokens.append(int(logits.argmax()))
        if len(tokens) < n:
            logits, state = model.forward(tokens[-1:], state)
    return tokens


STRATEGY_FILES = ("pip", "prepared")  # formats whose weights are stored as a strategy of ours prepares them

# A candidate whose strategy our runner reproduces exactly, in fp32 activations (int8 weights included: the
# pip package's fp32i8 and ours differ by rel L2 2e-6 at L12 C384), is also held to the same strategy run on
# the reference ("twin"): a damaged matrix that hides under the scheme's own error against fp32 (1% noise in
# one matrix: rel L2 ~3e-3 where int8 itself makes 0.04-0.15) stands out against the twin.
TWIN = Tolerance(math.inf, 1e-4, 1e-6, 0.0, "the same strategy run on the reference by our runner: the same"
                 " math, so only summation order differs (measured rel L2 <= 2.3e-6 for the pip package's int8)")


def twin_run(ref: ReferenceRun, strategy: str | None) -> dict[str, torch.Tensor] | None:
    """Sequence-mode logits of the reference run with the candidate's own strategy, where that strategy's
    activations are all fp32 (fp16/bf16 activations round differently in each runtime: no exact twin)."""
    if strategy is None or ref.ckpt is None:
        return None
    placements = make_plan(ref.spec, None, strategy).placements
    if any(p.atype != torch.float32 for p in placements):
        return None
    return strategy_logits(ref, strategy)


def strategy_logits(ref: ReferenceRun, strategy: str) -> dict[str, torch.Tensor]:
    """Sequence-mode logits of the reference checkpoint run with `strategy`, per stream; each strategy runs once
    (an int8 candidate's scheme noise and its same-strategy twin are the same run)."""
    key = str(parse_strategy(strategy))
    if key not in ref.strategy_runs:
        model = Model(ref.ckpt, key, ln0_fold=ref.ln0_fold)
        ref.strategy_runs[key] = {name: model.forward(t, full_output=True)[0] for name, t in ref.streams.items()}
    return ref.strategy_runs[key]


def candidate_run(candidate: str | Path, ref: ReferenceRun, strategy: str | None = None, runner: str = "client",
                  reference: str | Path = "the reference") -> ClientRun:
    """The candidate on the reference's streams: in its format's runtime (runner "client", where the registry
    names one), else loaded by our reader (ONNX: onnxruntime) and run like the reference."""
    runner = runner_named(runner)
    step("verify: running the candidate", 0, 1)
    run = _candidate_run(candidate, ref, strategy, runner, reference)
    step("verify: running the candidate", 1, 1)
    return run


def _candidate_run(candidate, ref: ReferenceRun, strategy, runner: str, reference) -> ClientRun:
    fmt, probe = detect(candidate)
    note = ""
    if runner == "client" and fmt.client_run is not None:
        try:
            run = fmt.client_run(probe.path, strategy, ref.streams, ref.split, ref.spec)
        except NoClient as e:  # our reader runs it, and the verdict says why
            run, note = None, f"checked with our reader only: {e}"
        except ClientFailed as e:
            return ClientRun(fmt.runtime, "as it is", {}, {"fp32"}, failure=str(e))
        if run is not None:  # None: no runtime for this kind of file in its format (HF v5.2/v6): our reader
            return run
    # the probe already holds what sniffing read; original weights are folded as the reference is
    # original weights get the reference's state file too; converted files carry the state they were made with
    model = load_detected(fmt, probe, strategy, ref.ln0_fold if fmt.load is None else "fp32",
                          ref.state if fmt.load is None else None)
    _check_same_model(model, candidate, ref.spec, reference)
    schemes = set(model.weight_schemes) | (fmt.stored(probe.path) if fmt.stored else set())
    stored = stored_precision(model.spec)  # a file stored less precisely than its reference: a web-rwkv .st (F16)
    if BOUND_ORDER.index(stored) > BOUND_ORDER.index(stored_precision(ref.spec)):
        schemes.add(stored)
    name = model.runner_name + ("" if fmt.read else f" reading {fmt.summary}")
    outputs = {n: run_ours(model, toks, ref.split) for n, toks in ref.streams.items()}
    # levels chosen by calibration round differently from the strategy's own int8 by design: no exact twin
    calibrated_levels = (probe.safetensors_metadata or {}).get("rwkv_convert.calibration", "none") != "none"
    twin = str(model.strategy) if fmt.name in STRATEGY_FILES and not calibrated_levels else None
    return ClientRun(name, str(model.strategy), outputs, schemes, twin=twin, note=note)


def score(ref: ReferenceRun, cand: ClientRun, candidate: str | Path, reference: str | Path,
          calibrate: bool = True, overrides: dict[str, float] | None = None) -> VerifyReport:
    """Every stream and mode against the tolerance of the candidate's least precise weights, calibrated on the
    reference model (calibrated(), scheme_noise()) unless calibrate is False (the table alone). overrides:
    bounds the user sets instead ({"kl": 1e-4, ...}, Tolerance's field names), tighter or looser."""
    scheme, tol = tolerance_for(cand.schemes)
    if calibrate and ref.ckpt is not None:
        tol = calibrated(scheme, scheme_noise(ref, scheme))
    if overrides:
        unknown = sorted(set(overrides) - {"max_abs", "rel_l2", "kl", "top1"})
        if unknown:
            raise RwkvConvertError(f"unknown tolerance {', '.join(unknown)}; use max_abs, rel_l2, kl, top1")
        set_here = ", ".join(f"{k} {v:g}" for k, v in overrides.items())
        tol = dataclasses.replace(tol, **overrides, reason=f"set by the user: {set_here}; else {tol.reason}")
    report = VerifyReport(candidate=str(candidate), reference=str(reference),
                          runner=f"{cand.runner} ({cand.strategy})", scheme=scheme, tolerance=tol,
                          tokens=len(next(iter(ref.streams.values()))), note=cand.note)
    if cand.failure:
        report.passed, report.worst = False, cand.failure
        return report
    non_finite = None
    for stream in ref.streams:
        report.baseline[stream] = noise_baseline(ref.outputs[stream]["seq"])
        for mode in MODES:
            key = _MODE_KEYS[mode]
            want, got = ref.outputs[stream][key], cand.outputs[stream][key]
            every_position = key not in cand.positions
            if not every_position:  # a client that gives these rows only (runtimes/web_rwkv.py)
                want = want[cand.positions[key]]
            if got.shape != want.shape:
                raise RwkvConvertError(f"the candidate's logits have shape {tuple(got.shape)}, expected"
                                       f" {tuple(want.shape)}: it is not a conversion of {reference}")
            if not torch.isfinite(got).all():
                non_finite = non_finite or f"{stream}/{mode} non-finite logits"
            max_abs, rel_l2, kl, top1_all = compare(want, got)
            top1, judged = confident_top1(want, got, tol.max_abs)
            state = state_difference(ref.outputs[stream][key + "_state"], cand.outputs[stream].get(key + "_state"))
            row = report.rows[f"{stream}/{mode}"] = Metrics(max_abs, rel_l2, kl, top1, state, judged, top1_all)
            if stream == "fixed" and ref.greedy_from is not None and every_position:
                row.greedy, row.greedy_of, row.greedy_misses = greedy_agreement(want, got, ref.greedy_from,
                                                                                tol.max_abs)
    # after the shape checks above: a candidate of another model is that one line, not a torch error
    twin = twin_run(ref, cand.twin) if calibrate else None
    for stream, logits in (twin or {}).items():
        _, rel_l2, kl, _ = compare(logits, cand.outputs[stream]["seq"])
        report.twin[stream] = Metrics(None, rel_l2, kl, None, None)  # judged on rel L2 and KL only
    checks = verdict_checks(report)
    row, name, _, ratio = max(checks, key=lambda c: c[3])
    report.passed = non_finite is None and ratio <= 1
    report.worst = non_finite or f"{row} {name}"
    return report


def verify(candidate: str | Path, reference: str | Path, strategy: str | None = None, tokens: int = 64,
           seed: int = 0, runner: str = "client", ln0_fold: str | None = None,
           state: str | Path | None = None, trust_remote_code: bool = False,
           adapters: Sequence[AdapterRef] = ()) -> VerifyReport:
    """runner: "client" runs the candidate in the runtime its format is for (the rwkv pip package for its
    converted files); "ours" runs it with rwkv-convert's reader and runner. ln0_fold: the reference runner's
    (and our runner's, for --runner ours) fold of ln0, "fp32" or "package" (docs/numerics.md); None: the
    candidate's own, i.e. "package" for pip-converted files (they hold the package's fold) and "fp32" else.
    state: a state-tuning file applied to the reference (and to a candidate that is original weights).
    trust_remote_code: run an HF directory's code even where it is not the copy we ship (the runner says so).
    adapters: fine-tuning adapters merged into the reference (never into the candidate: it is the merged model)."""
    runner = runner_named(runner)
    fmt, _ = detect(candidate)  # a missing or unreadable candidate fails before the reference is run
    if ln0_fold is None:
        ln0_fold = "package" if fmt.name == "pip" else "fp32"
    ref = reference_run(reference, tokens, seed, ln0_fold, state, adapters)
    applied = ref.ckpt.applied_adapters
    shown = str(reference) + "".join(f" + adapter {a.describe()}" for a in applied)
    shown += "" if state is None else f" with the state {state}"
    with trusting_remote_code(trust_remote_code):
        run = candidate_run(candidate, ref, strategy, runner, reference)
    report = score(ref, run, candidate, shown)
    report.ln0_fold = ln0_fold
    report.adapters = [a.to_dict() for a in applied]
    return report


def format_report(report: VerifyReport) -> str:
    tol = report.tolerance
    lines = [f"candidate  {report.candidate}", f"runner     {report.runner}",
             f"reference  {report.reference} (rwkv-convert runner, cpu fp32"
             + (", ln0 folded as the pip package folds it)" if report.ln0_fold == "package" else ")"),
             f"tolerance  {report.scheme}: max |Δ| <= {tol.max_abs:g}, rel L2 <= {tol.rel_l2:g}, KL <= {tol.kl:g},"
             f" top-1 >= {tol.top1:.0%}  ({tol.reason})"]
    if report.twin:
        lines.append(f"           same strategy on the reference: rel L2 <= {TWIN.rel_l2:g}, KL <= {TWIN.kl:g}"
                     f"  ({TWIN.reason})")
    if report.baseline:
        share = NOISE_BASELINE
        lines.append(f"           and far from a model that knows nothing of the input: KL <= {share['kl']:g}x,"
                     f" rel L2 <= {share['rel_l2']:g}x the noise baseline's, top-1 of all positions"
                     f" {share['top1']:.0%} of the way from its share to 100%")
    lines += ["",
              f"{'stream/mode':<20}{'max |Δlogit|':>14}{'rel L2':>11}{'KL':>11}{'top-1':>8}{'top-1*':>8}{'of':>5}"
              f"{'greedy':>8}{'state Δ':>11}"]
    for name, m in report.rows.items():
        state = f"{m.state_max_abs:.2e}" if m.state_max_abs is not None else "-"
        confident = f"{m.top1:.1%}" if m.top1_positions else "-"  # a share of no positions is no figure
        every = f"{m.top1_all:.1%}" if m.top1_all is not None else "-"
        greedy = f"{m.greedy}/{m.greedy_of}" if m.greedy is not None else "-"
        lines.append(f"{name:<20}{m.max_abs:>14.2e}{m.rel_l2:>11.2e}{m.kl:>11.2e}{every:>8}{confident:>8}"
                     f"{m.top1_positions if m.top1_positions is not None else '-':>5}{greedy:>8}{state:>11}")
    for stream, m in report.twin.items():
        lines.append(f"{stream + '/same-strategy':<20}{'-':>14}{m.rel_l2:>11.2e}{m.kl:>11.2e}{'-':>8}{'-':>8}{'-':>5}"
                     f"{'-':>8}{'-':>11}")
    for stream, m in report.baseline.items():
        lines.append(f"{stream + '/noise-baseline':<20}{m.max_abs:>14.2e}{m.rel_l2:>11.2e}{m.kl:>11.2e}{m.top1:>8.1%}"
                     f"{'-':>8}{'-':>5}{'-':>8}{'-':>11}")
    verdict = "PASS" if report.passed else "FAIL"
    lines += ["", "top-1: argmax agreement over every position; top-1*: where the reference's best logit leads by"
                  " more than the max |Δ| bound (of: how many positions; - where none)",
              "greedy: of the tokens the reference generates after the fixed stream's first half, how many the"
              " candidate generates too before it first differs (fp32/fp16 files must, near ties aside)",
              "noise-baseline: the reference's own logits at other positions (the stream rolled by half), what a"
              " model that knows nothing of the input scores; state Δ: max |Δ| of the final recurrent state"
              " (reported, not judged)",
              f"{verdict}{f' ({report.note})' if report.note else ''}: {report.tokens} tokens per stream; worst:"
              f" {report.worst}"]
    return "\n".join(lines)

