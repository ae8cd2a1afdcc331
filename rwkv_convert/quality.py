"""What each precision and quantization costs a model, measured in the runtime each file is made for.

For every scheme, the source is exported (GGUF for llama.cpp, ONNX for onnxruntime, a prepared safetensors
file of one strategy for our runner), the file is run on a text split into windows (each scored from a
fresh state), and the result is compared with the source at fp32: bits per byte of the text, KL divergence
from the fp32 next-token distribution, top-1 agreement, and the file's bytes per parameter."""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .adapters import AdapterRef
from .atomic import AtomicOutput
from .bundled import HELD_OUT_TEXT, bundled_file
from .calibration import BUNDLED
from .errors import RwkvConvertError
from .formats.gguf_file import MIXES
from .formats.registry import convert, detect, load_detected, read_checkpoint
from .precision import StorageType, by_gguf, by_mlx, by_onnx, storage
from .runner import Model
from .runtimes.llama_cpp import LlamaCppSession
from .runtimes.mlx_lm import MlxSession
from .runtimes.ours import ForwardSession
from .strategy import allocate, parse_strategy
from .tokenizer import default_tokenizer


@dataclass(frozen=True)
class Scheme:
    name: str
    to: str | None  # the export (None: the source itself, at fp32)
    options: dict
    runtime: str  # "ours", "onnxruntime", "llama.cpp" or "mlx-lm"

    @property
    def storage(self) -> StorageType | None:
        """The storage type of its large matrices, from the precision table; None where no one type is given
        (a --target-size plan mixes types per tensor, a file measured as it is keeps its own)."""
        if self.to == "gguf":
            quant = self.options.get("quant")
            return by_gguf(MIXES.get(quant, (quant,))[0].upper()) if quant else None  # a mix: its base type
        if self.to is not None and not self.options:
            return None
        if self.to == "onnx":
            quant = self.options.get("quant", "none")
            return by_onnx(self.options.get("dtype", "fp32") if quant == "none" else quant)
        if self.to == "mlx":
            quant = self.options.get("quant", "none")
            return by_mlx(self.options.get("dtype", "fp32") if quant == "none" else quant)
        placements = allocate(parse_strategy(self.options.get("strategy", "cpu fp32")), 1)
        return storage(placements[0].precision)


SCHEMES = {s.name: s for s in (
    Scheme("fp32", None, {}, "ours"),
    Scheme("fp16", "prepared", {"strategy": "cpu fp16"}, "ours"),
    Scheme("bf16", "prepared", {"strategy": "cpu bf16"}, "ours"),
    Scheme("fp32i8", "prepared", {"strategy": "cpu fp32i8"}, "ours"),
    Scheme("fp32i8-cal", "prepared", {"strategy": "cpu fp32i8", "calibration": BUNDLED},
           "ours"),
    Scheme("fp16i8", "prepared", {"strategy": "cpu fp16i8"}, "ours"),
    Scheme("fp16i8-cal", "prepared", {"strategy": "cpu fp16i8", "calibration": BUNDLED},
           "ours"),
    Scheme("gguf-f16", "gguf", {"quant": "f16"}, "llama.cpp"),
    Scheme("gguf-q8_0", "gguf", {"quant": "q8_0"}, "llama.cpp"),
    Scheme("gguf-q5_1", "gguf", {"quant": "q5_1"}, "llama.cpp"),
    Scheme("gguf-q5_0", "gguf", {"quant": "q5_0"}, "llama.cpp"),
    Scheme("gguf-q4_1", "gguf", {"quant": "q4_1"}, "llama.cpp"),
    Scheme("gguf-q4_0", "gguf", {"quant": "q4_0"}, "llama.cpp"),
    Scheme("gguf-q6_k", "gguf", {"quant": "q6_k"}, "llama.cpp"),
    Scheme("gguf-q5_k", "gguf", {"quant": "q5_k"}, "llama.cpp"),
    Scheme("gguf-q4_k", "gguf", {"quant": "q4_k"}, "llama.cpp"),
    Scheme("gguf-q3_k_m", "gguf", {"quant": "q3_k_m"}, "llama.cpp"),
    Scheme("gguf-q2_k", "gguf", {"quant": "q2_k"}, "llama.cpp"),
    *(Scheme(f"gguf-{q}-cal", "gguf", {"quant": q, "calibration": BUNDLED}, "llama.cpp")
      for q in ("q5_1", "q5_0", "q4_1", "q4_0", "q5_k", "q4_k", "q3_k_m", "q2_k")),
    # calibrated by importance-weighted rounding alone, to set beside GPTQ (-cal); not in the default set
    *(Scheme(f"gguf-{q}-round", "gguf", {"quant": q, "calibration": BUNDLED, "calibration_method": "rounding"},
             "llama.cpp") for q in ("q4_0", "q4_k")),
    Scheme("onnx-fp16", "onnx", {"dtype": "fp16", "graphs": "sequence"}, "onnxruntime"),
    Scheme("onnx-int8", "onnx", {"quant": "int8", "graphs": "sequence"}, "onnxruntime"),
    Scheme("onnx-int4", "onnx", {"quant": "int4", "graphs": "sequence"}, "onnxruntime"),
    Scheme("onnx-int8-all", "onnx", {"quant": "int8", "graphs": "sequence", "quant_embedding_head": True},
           "onnxruntime"),
    Scheme("onnx-int4-all", "onnx", {"quant": "int4", "graphs": "sequence", "quant_embedding_head": True},
           "onnxruntime"),
    # calibrated (GPTQ on the bundled text); fp16 weights and scales with the embedding and head quantized too
    Scheme("onnx-int8-cal", "onnx", {"quant": "int8", "graphs": "sequence", "calibration": BUNDLED}, "onnxruntime"),
    Scheme("onnx-int4-cal", "onnx", {"quant": "int4", "graphs": "sequence", "calibration": BUNDLED}, "onnxruntime"),
    Scheme("onnx-fp16-int4-all-cal", "onnx", {"dtype": "fp16", "quant": "int4", "graphs": "sequence",
                                               "quant_embedding_head": True, "calibration": BUNDLED}, "onnxruntime"),
    Scheme("onnx-fp16-int4-cal-int8-tables", "onnx", {
        "dtype": "fp16", "quant": "int4", "graphs": "sequence", "quant_embedding_head": True,
        "embedding_head_quant": "int8", "calibration": BUNDLED}, "onnxruntime"),
    # MatMulNBits computing in fp32 (accuracy_level 1) instead of int8: what quantized activations cost
    *(Scheme(f"onnx-int{b}-fp32compute", "onnx", {"quant": f"int{b}", "graphs": "sequence", "compute": "fp32"},
             "onnxruntime") for b in (8, 4)),
    Scheme("onnx-fp16-int8-all-cal-fp32compute", "onnx", {
        "dtype": "fp16", "quant": "int8", "graphs": "sequence", "quant_embedding_head": True, "calibration": BUNDLED,
        "compute": "fp32"}, "onnxruntime"),
    # MLX's affine groups of 64 in mlx-lm (mlx_lm.convert's own rounding), and calibrated (GPTQ)
    *(Scheme(f"mlx-{q}", "mlx", {"quant": q}, "mlx-lm") for q in ("q8", "q6", "q4", "q3")),
    *(Scheme(f"mlx-{q}-cal", "mlx", {"quant": q, "calibration": BUNDLED}, "mlx-lm") for q in ("q4", "q3")),
)}
# One row per choice a user makes, calibrated beside plain where calibration matters (the 4-bit types and our
# int8); `--schemes all` measures every scheme (about twice as long).
QUICK_BYTES = 16384  # the default set scores the text's first 16 KB (--full and --schemes: all of it)
# one file per runtime and width, so that a first look takes about a minute on the bundled model; --full for the
# comparisons (calibrated against plain, every GGUF block type), --schemes all for everything
DEFAULT_SCHEMES = ("fp32", "bf16", "fp32i8", "gguf-q8_0", "gguf-q4_k", "onnx-int8", "onnx-int4")
FULL_SCHEMES = ("fp32", "fp16", "bf16", "fp32i8", "fp32i8-cal",
                "gguf-f16", "gguf-q8_0", "gguf-q6_k", "gguf-q5_k", "gguf-q5_0", "gguf-q4_1", "gguf-q4_1-cal",
                "gguf-q4_0", "gguf-q4_0-cal", "gguf-q4_k", "gguf-q4_k-cal", "gguf-q3_k_m", "gguf-q3_k_m-cal",
                "gguf-q2_k", "gguf-q2_k-cal",
                "onnx-fp16", "onnx-int8", "onnx-int4", "onnx-int4-cal", "onnx-fp16-int4-cal-int8-tables",
                "mlx-q8", "mlx-q4", "mlx-q4-cal")
MAX_REFERENCE_BYTES = 4 << 30
SUFFIXES = {"gguf": "gguf", "onnx": "onnx", "prepared": "safetensors", "mlx": "mlx"}  # mlx: a directory


@dataclass
class SchemeResult:
    scheme: str
    runtime: str
    file_bytes: int
    bytes_per_param: float
    bits_per_byte: float
    kl: float  # mean KL(fp32 || scheme) over the scored positions, nats
    top1: float  # fraction of positions whose most likely next token is the fp32 one
    seconds: float


@dataclass
class QualityReport:
    source: str
    text: str
    text_bytes: int
    tokens: int
    windows: int
    window: int
    n_params: int
    results: list[SchemeResult] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # scheme -> why it was not measured

    def to_json(self) -> dict:
        return asdict(self)


def parse_schemes(text: str | None, full: bool = False) -> list[str]:
    """A comma-separated list of scheme names, or "all"; None: the default set (full: the larger one)."""
    if not text:
        return list(FULL_SCHEMES if full else DEFAULT_SCHEMES)
    names = [s.strip() for s in text.split(",") if s.strip()]
    if names == ["all"]:
        return list(SCHEMES)
    unknown = [n for n in names if n not in SCHEMES]
    if unknown or not names:
        raise RwkvConvertError(f"unknown scheme {', '.join(unknown) or repr(text)}; choose from {', '.join(SCHEMES)}")
    return ["fp32", *(n for n in names if n != "fp32")]  # the reference is always measured, first


def choose(schemes: str | None, full: bool, max_bytes: int | None) -> tuple[list[str], int | None]:
    """The schemes to measure and the bytes of text to score, from --schemes, --full and --max-bytes: the first
    look (neither set) scores QUICK_BYTES, a minute on the bundled model."""
    if full and schemes:
        raise RwkvConvertError("--full is a set of schemes: give it or --schemes, not both")
    quick = max_bytes is None and not full and not schemes
    return parse_schemes(schemes, full), QUICK_BYTES if quick else max_bytes


def windows_of(tokens: list[int], window: int) -> list[list[int]]:
    """Consecutive windows of `window` tokens (the last may be shorter; one of a single token is dropped:
    it predicts nothing)."""
    out = [tokens[i:i + window] for i in range(0, len(tokens), window)]
    return [w for w in out if len(w) > 1]


BATCH_LOGIT_BYTES = 256 << 20  # onnxruntime runs equal windows as one batch, up to this much of logits at once


class _Logits:
    """Runs one file in its runtime: the [T, V] fp32 logits of each window, each from a fresh state."""

    def __init__(self, scheme: Scheme, path: Path, window: int):
        self.scheme = scheme
        if scheme.runtime == "llama.cpp":
            self.session = LlamaCppSession(path, n_ctx=max(64, window))
        elif scheme.runtime == "mlx-lm":
            self.session = MlxSession(path)
        else:
            fmt, probe = detect(path)
            self.model = load_detected(fmt, probe)
            self.session = ForwardSession(self.model)

    def each(self, chunks: list[list[int]]) -> Iterator[torch.Tensor]:
        if self.scheme.runtime == "onnxruntime":  # a batch of windows per run: the Scan steps once for all
            vocab = self.model.spec.vocab_size
            start = 0
            while start < len(chunks):
                T = len(chunks[start])
                size = max(1, BATCH_LOGIT_BYTES // (T * vocab * 4))
                end = start + 1
                while end < len(chunks) and end - start < size and len(chunks[end]) == T:
                    end += 1
                logits, _ = self.model.forward_batch(chunks[start:end], None, full_output=True)
                yield from (torch.from_numpy(np.ascontiguousarray(row)).float() for row in logits)
                start = end
            return
        for tokens in chunks:
            yield self.session.logits([tokens]).float()


def measure(source: str | Path, text: str | Path | None = None, schemes: list[str] | None = None,
            window: int = 1024, max_bytes: int | None = None,
            progress: Callable[[str], None] = lambda _: None, target_size: str | None = None,
            state: str | Path | None = None, adapters: Sequence[AdapterRef] = ()) -> QualityReport:
    """Each scheme of `schemes` (default all) through its runtime on `text` (default the bundled held-out
    text), against the source at fp32. target_size: also a GGUF planned to that size (gguf-target-SIZE).
    state: a state-tuning file applied to the source (every window starts from it; formats that cannot carry
    it are listed as not measured). adapters: fine-tuning adapters merged into the source (and every export).
    Exports go to a temporary directory and are removed after."""
    if window < 2:
        raise RwkvConvertError("--window must be at least 2 tokens")
    ckpt = read_checkpoint(source, state, adapters)
    spec = ckpt.spec
    text_path, data, tokens, chunks, scored_bytes = _scored_text(spec, text, max_bytes, window)
    report = QualityReport(str(ckpt.path), str(text_path), len(data), len(tokens), len(chunks), window, spec.n_params)
    names = parse_schemes(",".join(schemes) if schemes else None)
    known = dict(SCHEMES)
    if target_size:
        planned = Scheme(f"gguf-target-{target_size}", "gguf", {"target_size": target_size}, "llama.cpp")
        known[planned.name] = planned
        names.append(planned.name)

    reference = Model(ckpt, "cpu fp32")
    ref_logp: list[torch.Tensor] = []
    # log-softmax per window, fp32: a rounded reference would bias KL by as much as int8's own KL
    with tempfile.TemporaryDirectory(prefix="rwkv-convert-quality-") as tmp:
        for n, name in enumerate(names, 1):
            scheme = known[name]
            started = time.monotonic()
            label = f"[{n}/{len(names)}] {name}"
            if scheme.to is None:
                path, run = ckpt.path, None
            else:
                progress(f"{label}: exporting")
                path = Path(tmp) / f"{name}.{SUFFIXES[scheme.to]}"
                try:
                    convert(ckpt.path, scheme.to, path, state=state, adapters=adapters, **scheme.options)
                    run = _Logits(scheme, path, window)
                except RwkvConvertError as e:
                    report.skipped[name] = str(e)
                    progress(f"{label}: skipped ({e})")
                    continue
            if run is None:
                outputs = (reference.forward(chunk, None, full_output=True)[0].float() for chunk in chunks)
            else:
                outputs = run.each(chunks)
            each_window = lambda w, label=label: progress(f"{label}: window {w + 1}/{len(chunks)}")  # noqa: E731
            nll, kl, agree, positions = _score(outputs, chunks, ref_logp, name, each_window)
            size = _bytes(Path(tmp).glob(f"{name}.*")) if scheme.to else ckpt.path.stat().st_size
            report.results.append(SchemeResult(
                name, _runtime_name(scheme), size, size / max(spec.n_params, 1),
                nll / math.log(2) / max(scored_bytes, 1), kl / positions, agree / positions,
                time.monotonic() - started))
            if scheme.to is not None:
                for f in Path(tmp).glob(f"{name}.*"):
                    shutil.rmtree(f) if f.is_dir() else f.unlink()
    report.results.sort(key=lambda r: (-r.file_bytes, r.scheme))
    return report


def _scored_text(spec, text: str | Path | None, max_bytes: int | None, window: int):
    """(path, bytes, tokens, windows, bytes predicted) of the text to score; refused where the fp32 reference
    of that much text would not fit in memory."""
    text_path = Path(text) if text else bundled_file(HELD_OUT_TEXT)
    try:
        data = text_path.read_bytes()
    except OSError as e:
        raise RwkvConvertError(f"cannot read the text {text_path}: {e.strerror or e}") from None
    data = data[:max_bytes] if max_bytes else data
    tokenizer = default_tokenizer(spec.vocab_size)
    tokens = tokenizer.encode_bytes(data)
    chunks = windows_of(tokens, window)
    if not chunks:
        raise RwkvConvertError(f"{text_path} holds fewer than 2 tokens: nothing to score")
    # bytes of each predicted token (a World token is several bytes): bits per byte, whatever the tokenizer
    token_bytes = np.array([len(tokenizer.token_bytes(t)) for t in range(spec.vocab_size)], dtype=np.int64)
    scored_bytes = sum(int(token_bytes[c[1:]].sum()) for c in chunks)
    held = len(tokens) * spec.vocab_size * 4
    if held > MAX_REFERENCE_BYTES:
        raise RwkvConvertError(f"the fp32 reference of {len(tokens):,} tokens x {spec.vocab_size:,} ids needs"
                               f" {held / 2**30:.1f} GiB of memory; score less text (--max-bytes)")
    return text_path, data, tokens, chunks, scored_bytes


def _score(outputs: Iterator[torch.Tensor], chunks: list[list[int]], ref_logp: list[torch.Tensor], name: str,
           each_window: Callable[[int], None] = lambda w: None) -> tuple[float, float, float, int]:
    """(negative log-likelihood in nats, summed KL from the reference, top-1 agreements, positions) of one
    run's logits per window. An empty ref_logp is filled: this run is the reference."""
    is_reference = not ref_logp
    nll = kl = agree = 0.0
    positions = 0
    for w, (chunk, logits) in enumerate(zip(chunks, outputs, strict=True)):
        each_window(w)
        logp = torch.log_softmax(logits, -1)
        if is_reference:
            ref_logp.append(logp)
        want = ref_logp[w]
        if not torch.isfinite(logp).all():
            raise RwkvConvertError(f"{name}: non-finite logits in window {w + 1}: the file is broken")
        target = torch.tensor(chunk[1:])
        nll -= float(logp[:-1].gather(1, target[:, None]).sum())
        kl += float((want.exp() * (want - logp)).sum(-1).clamp_min(0).sum())
        agree += float((want.argmax(-1) == logp.argmax(-1)).sum())
        positions += len(chunk)
    return nll, kl, agree, positions


_REFERENCE_FIGURES: dict[tuple, tuple] = {}  # per process: (source, text, bytes, window) -> the fp32 run


def file_figures(source: str | Path, path: str | Path, text: str | Path | None = None, max_bytes: int | None = None,
                 window: int = 1024, adapters: Sequence[AdapterRef] = ()) -> dict:
    """One exported file's quality figures on `text` (default the bundled held-out text), run in the runtime
    `quality` runs its format in (llama.cpp for GGUF, onnxruntime for ONNX, mlx-lm for MLX, our runner for the
    others): bits per byte, its change from the source at fp32 (with `adapters` merged), KL from the source and
    top-1 agreement."""
    key = (str(source), tuple(adapters), str(text), max_bytes, window)
    if key not in _REFERENCE_FIGURES:
        ckpt = read_checkpoint(source, adapters=adapters)
        text_path, data, _, chunks, scored_bytes = _scored_text(ckpt.spec, text, max_bytes, window)
        reference = Model(ckpt, "cpu fp32")
        ref_logp: list[torch.Tensor] = []
        nll, *_ = _score((reference.forward(c, None, full_output=True)[0].float() for c in chunks), chunks, ref_logp,
                         "fp32")
        _REFERENCE_FIGURES[key] = (text_path, len(data), chunks, scored_bytes, ref_logp, nll)
    text_path, n_bytes, chunks, scored_bytes, ref_logp, ref_nll = _REFERENCE_FIGURES[key]
    scheme = _file_scheme(path)
    nll, kl, agree, positions = _score(_Logits(scheme, Path(path), window).each(chunks), chunks, ref_logp,
                                       Path(path).name)
    return {"text": text_path.name, "text_bytes": n_bytes, "runtime": _runtime_name(scheme),
            "bits_per_byte": nll / math.log(2) / max(scored_bytes, 1),
            "delta_bits_per_byte": nll / max(ref_nll, 1e-30) - 1, "kl": kl / positions, "top1": agree / positions}


def file_logits(path: str | Path, tokens: list[int]) -> torch.Tensor:
    """One exported file's [T, V] fp32 logits on `tokens` from a fresh state, in the runtime file_figures uses."""
    return next(_Logits(_file_scheme(path), Path(path), max(64, len(tokens))).each([tokens]))


def _file_scheme(path: str | Path) -> Scheme:
    fmt, _ = detect(path)
    return Scheme(fmt.name, fmt.name, {}, {"gguf": "llama.cpp", "onnx": "onnxruntime", "mlx": "mlx-lm"}.get(fmt.name,
                                                                                                     "ours"))


def _runtime_name(scheme: Scheme) -> str:
    return {"ours": "rwkv-convert runner", "llama.cpp": "llama.cpp (llama-cpp-python)",
            "onnxruntime": "onnxruntime", "mlx-lm": "mlx-lm"}[scheme.runtime]


def _bytes(paths) -> int:
    """The bytes of these files, and of every file in these directories (an MLX export)."""
    return sum(f.stat().st_size for p in paths for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file())


def table(report: QualityReport) -> str:
    head = (f"{Path(report.source).name}: {report.n_params:,} parameters; {Path(report.text).name}:"
            f" {report.text_bytes:,} bytes, {report.tokens:,} tokens in {report.windows} windows of {report.window}")
    cols = ("scheme", "runtime", "bytes", "bytes/param", "bits/byte", "Δ bits/byte", "KL", "top-1")
    ref = next((r for r in report.results if r.scheme == "fp32"), None)
    rows = [cols]
    for r in report.results:
        delta = f"{(r.bits_per_byte / ref.bits_per_byte - 1) * 100:+.2f}%" if ref else "-"
        rows.append((r.scheme, r.runtime, f"{r.file_bytes:,}", f"{r.bytes_per_param:.3f}", f"{r.bits_per_byte:.4f}",
                     delta, f"{r.kl:.2e}", f"{r.top1 * 100:.1f}%"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(cols))]
    lines = [head, ""] + ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines += [f"{name}: not measured ({why})" for name, why in report.skipped.items()]
    return "\n".join(lines)


def plotting():
    """matplotlib's pyplot, drawing to files; checked before a --plot run does any work."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RwkvConvertError("--plot needs matplotlib: pip install 'rwkv-convert[plot]'") from None
    return plt


def plot(report: QualityReport, out: Path) -> None:
    """Bytes per parameter against bits per byte, one labelled point per scheme (matplotlib)."""
    plt = plotting()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in report.results:
        ax.scatter(r.bytes_per_param, r.bits_per_byte)
        ax.annotate(r.scheme, (r.bytes_per_param, r.bits_per_byte), textcoords="offset points", xytext=(4, 4),
                    fontsize=8)
    ax.set_xlabel("file bytes per parameter")
    ax.set_ylabel(f"bits per byte ({Path(report.text).name})")
    ax.set_title(Path(report.source).name)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with AtomicOutput(out) as target:
        fig.savefig(target.temp(), format="png", dpi=120)
    plt.close(fig)
