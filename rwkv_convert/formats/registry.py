"""The registry of file formats: the one place that decides what a file is (`detect`), what reads it
(`read_checkpoint`, `load`), what converts to what (`convert`, `capabilities`). Each entry is a format
module's FORMAT (formats/base.py says what one declares); adding a format is adding its module and one line
here. Sniffing goes in this order, first match wins: cheap, unambiguous markers first, torch files last."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..adapters import AdapterRef, adapter_inputs, with_adapters
from ..atomic import protecting
from ..bundled import model_path
from ..checkpoint import Checkpoint
from ..errors import RwkvConvertError, UnsupportedError
from ..plan import make_plan
from ..runner import Model
from ..state_file import apply_state_option
from ..units import check_memory
from . import gguf_file, hf, mlx, pip_pth, prepared, pth, safetensors_blinkdl, web_rwkv
from .base import Format, Probe
from .onnx import format as onnx

FORMATS: tuple[Format, ...] = (
    mlx.FORMAT,  # a directory with config.json that says it is ours for mlx-lm
    hf.FORMAT,  # a directory with config.json
    gguf_file.FORMAT,  # magic bytes
    onnx.FORMAT,  # .onnx (no magic bytes)
    prepared.FORMAT,  # safetensors with our layout tag
    web_rwkv.FORMAT,  # safetensors with web-rwkv's names
    safetensors_blinkdl.FORMAT,  # any other safetensors
    pip_pth.FORMAT,  # a torch file with _strategy
    pth.FORMAT,  # anything else: tried as an original checkpoint
)
DEFAULT_STRATEGY = "cpu fp32"


def by_name(name: str) -> Format:
    for fmt in FORMATS:
        if fmt.name == name:
            return fmt
    raise RwkvConvertError(f"unknown format {name!r}; the formats are {', '.join(f.name for f in FORMATS)}")


def writers() -> list[Format]:
    return [fmt for fmt in FORMATS if fmt.write is not None]


def targets() -> list[str]:
    """What `convert --to` accepts: each writable format's name, then each family's name (safetensors: the older
    spelling `--to safetensors --layout NAME` of the formats stored in safetensors files)."""
    names = [fmt.name for fmt in writers()]
    return names + list(dict.fromkeys(fmt.family for fmt in writers() if fmt.family))


def writer_for(to: str, layout: str | None = None) -> Format:
    """The format `convert(to=..., layout=...)` writes: a format's own name, or a family (to="safetensors") and
    the layout that names one of its formats."""
    family = [fmt for fmt in writers() if fmt.family == to]
    if family:
        names = ", ".join(f.name for f in family)
        if layout is None:
            raise RwkvConvertError(f"--to {to} needs --layout ({names}); or give the layout as --to")
        for fmt in family:
            if fmt.name == layout:
                return fmt
        raise RwkvConvertError(f"unknown {to} layout {layout!r}; choose from {names}")
    for fmt in writers():
        if fmt.name == to and layout in (None, to):
            return fmt
    if layout is not None:
        raise RwkvConvertError(f"--layout is for --to {', '.join(sorted({f.family for f in writers() if f.family}))},"
                               f" not --to {to}")
    raise RwkvConvertError(f"cannot convert to {to!r}; choose from {', '.join(targets())}")


# what an output's suffix says it is, where it says one thing (.safetensors is several formats; a folder is hf)
SUFFIX_TARGETS = {".gguf": "gguf", ".onnx": "onnx", ".st": "web-rwkv", ".pth": "pip"}


def target_for_output(output: str | os.PathLike, layout: str | None = None) -> tuple[str, str | None]:
    """(to, layout) for an output named without --to: from its suffix, or safetensors where a layout is given."""
    if layout is not None:
        return "safetensors", layout
    found = SUFFIX_TARGETS.get(Path(output).suffix.lower())
    if found is None:
        known = ", ".join(f"{suffix} ({to})" for suffix, to in SUFFIX_TARGETS.items())
        raise RwkvConvertError(f"cannot tell the format from the output name {Path(output).name!r}: give --to"
                               f" ({', '.join(targets())}); the names that say it: {known}")
    return found, None


def detect(path: str | os.PathLike) -> tuple[Format, Probe]:
    p = model_path(path)  # bundled:v7 names the bundled trained model
    if not p.exists():
        raise RwkvConvertError(f"{p}: no such file")
    probe = Probe(p)
    if p.is_dir() and not hf.FORMAT.sniff(probe):
        raise RwkvConvertError(f"{p} is a directory; give the path of a checkpoint file inside it")
    if p.is_file() and p.stat().st_size == 0:
        raise RwkvConvertError(f"{p} is empty (0 bytes); re-download or re-save the checkpoint")
    for fmt in FORMATS:
        if fmt.sniff(probe):
            return fmt, probe
    raise RwkvConvertError(f"{p} is not a file rwkv-convert reads")  # pth claims every file: not reached


def read_checkpoint(path: str | os.PathLike, state: str | os.PathLike | None = None,
                    adapters: Sequence[AdapterRef] = ()) -> Checkpoint:
    """Original weights from any format that holds them (a .pth, safetensors, an HF directory, a GGUF); with
    `adapters`, fine-tuning adapters merged into them in order (adapters.py: LoRA, PiSSA, Bone, DiSHA); with
    `state`, a state-tuning file applied to them (its shapes checked against the model)."""
    fmt, probe = detect(path)
    return _read_detected(fmt, probe, state, adapters)


def _read_detected(fmt: Format, probe: Probe, state=None, adapters: Sequence[AdapterRef] = ()) -> Checkpoint:
    if fmt.read is None:
        raise RwkvConvertError(f"{probe.path} is {fmt.summary}, not an original checkpoint: rwkv_convert.load(),"
                               " run and verify run it; convert from the source checkpoint")
    return apply_state_option(with_adapters(fmt.read(probe), adapters), state)


def load(path: str | os.PathLike, strategy: str | None = None, ln0_fold: str = "fp32",
         state: str | os.PathLike | None = None, adapters: Sequence[AdapterRef] = ()):
    """A runnable model from any readable file: original weights with `strategy` (default "cpu fp32"); files
    made for one strategy (pip-converted, prepared) with theirs (`strategy` must be that one or None); ONNX
    exports in onnxruntime (no strategy). ln0_fold "package": original weights get ln0 folded as the pip
    package folds it (docs/numerics.md). state: a state-tuning file applied to original weights; adapters:
    fine-tuning adapters merged into them."""
    return load_detected(*detect(path), strategy, ln0_fold, state, adapters)


def load_detected(fmt: Format, probe: Probe, strategy: str | None = None, ln0_fold: str = "fp32", state=None,
                  adapters: Sequence[AdapterRef] = ()):
    """load() of a path already detected (its probe keeps what sniffing read)."""
    if fmt.load is not None:
        if ln0_fold != "fp32":
            raise RwkvConvertError(f"--ln0-fold applies to original weights; {probe.path} ({fmt.summary}) is run"
                                   " as it was made")
        if state is not None:
            raise RwkvConvertError(f"--state applies to original weights; {probe.path} ({fmt.summary}) runs with the"
                                   " initial state it was converted with: give --state to convert instead")
        if adapters:
            raise RwkvConvertError(f"--lora applies to original weights; {probe.path} ({fmt.summary}) runs as it was"
                                   " converted: give --lora to convert instead")
        return fmt.load(probe, strategy)
    ckpt = _read_detected(fmt, probe, state, adapters)
    strategy = DEFAULT_STRATEGY if strategy is None else strategy
    plan = make_plan(ckpt.spec, ckpt.shapes, strategy)  # checked here, executed by the runner
    check_memory(sum(n for device, n in plan.device_bytes.items() if device.startswith("cpu")),
                 f"running {probe.path} at \"{strategy}\"", "use a narrower strategy (e.g. \"cpu bf16\" or \"cpu"
                 " fp32i8\"), free some memory, or use a machine with more")
    return Model(ckpt, plan, ln0_fold=ln0_fold)


def convert(source: str | os.PathLike, to: str, output: str | os.PathLike, state: str | os.PathLike | None = None,
            adapters: Sequence[AdapterRef] = (), **options: Any) -> list[Path]:
    """Convert SOURCE (original weights in any readable format) to the format `to` at `output`, with that
    format's options (e.g. quant="q8_0" for gguf; layout="hf" selects the safetensors layout); with `state`, a
    state-tuning file applied first (written into formats that carry an initial state; refused by the others);
    with `adapters`, fine-tuning adapters merged as the source streams.
    The source is read once and handed to the writer. Returns the paths written; nothing is left behind on
    failure."""
    fmt = writer_for(to, options.pop("layout", None))
    opts = fmt.options.build(fmt.target, options)
    ckpt = read_checkpoint(source, state, adapters)
    reason = fmt.supports(ckpt.spec) or (fmt.needs(ckpt.spec, opts) if fmt.needs else None)
    if reason:
        raise UnsupportedError(f"cannot convert {ckpt.path.name} to {fmt.target}: {reason}")
    inputs = [ckpt.path] + ([ckpt.applied_state] if ckpt.applied_state else []) + adapter_inputs(ckpt)
    # and any file an option names (a tokenizer, a calibration text)
    inputs += [Path(v) for v in options.values() if isinstance(v, (str, os.PathLike)) and Path(v).is_file()]
    with protecting(*inputs):  # no file of the output may be an input (or inside a source directory)
        return fmt.write(ckpt, Path(output), opts)


def capabilities(ckpt: Checkpoint) -> dict[str, str]:
    """What can be done with this checkpoint, by the same `supports` that convert obeys."""
    can: dict[str, str] = {"inspect": "yes"}
    can["run"] = "yes: any strategy (cpu|cuda|mps, fp32|fp16|bf16, i8, *N, *N+, ->)"  # every version and variant
    for fmt in writers():
        reason = fmt.supports(ckpt.spec)
        needed = fmt.needs(ckpt.spec, fmt.options()) if fmt.needs and not reason else None
        can[f"convert --to {fmt.target}"] = f"no: {reason}" if reason else f"with options: {needed}" if needed \
            else f"yes: {fmt.summary}, for {fmt.runtime}"
    can["verify"] = "yes: against this file as --reference"
    return can
