"""What every file format declares for the registry (formats/registry.py), the probe that sniffs a path
once, and the base of the formats' write options.

A format module declares one `Format`: how to recognise its files (`sniff`), how to read them (`read` ->
an original-weights Checkpoint, or `load` -> a runnable model), how to write them (`write` with its
`options` dataclass), which models it can hold (`supports(spec)` -> None or the reason why not: the one
place that says so), and the runtime its users run it in (`runtime`, and `client_run` to run a file
there for `verify`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from ..checkpoint import Checkpoint, load_raw
from ..errors import RwkvConvertError
from ..precision import no_counterpart
from ..runtimes.base import ClientRun
from ..spec import ModelSpec
from .safetensors_io import is_safetensors, read_header


class Probe:
    """A path being identified. Each format's sniff asks it for what it needs; the first bytes, a
    safetensors header and a torch file's top-level dict are each read at most once."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @cached_property
    def head(self) -> bytes:
        try:
            with open(self.path, "rb") as f:
                return f.read(16)
        except OSError:
            return b""

    @property
    def suffix(self) -> str:
        return self.path.suffix.lower()

    @cached_property
    def is_torch_file(self) -> bool:
        """A zip (torch >= 1.6) or a pickle (older torch.save): what torch.load reads."""
        pickle = self.head[:1] == b"\x80" and self.head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")  # PROTO 2-5
        return self.path.is_file() and (self.head.startswith(b"PK\x03\x04") or pickle)

    @cached_property
    def safetensors_header(self) -> tuple[dict[str, tuple[int, ...]], dict[str, str]] | None:
        """({tensor name: shape}, __metadata__) of a safetensors file (checked: a damaged header is one line),
        else None."""
        if not self.path.is_file() or not is_safetensors(self.path):
            return None
        entries, metadata, _ = read_header(self.path)
        return {name: tuple(entry[1]) for name, entry in entries.items()}, metadata

    @property
    def safetensors_metadata(self) -> dict[str, str] | None:
        header = self.safetensors_header
        return None if header is None else header[1]

    @cached_property
    def torch_raw(self) -> tuple[dict, bool]:
        """(top-level dict, mmapped) of a torch file, read once with weights_only=True."""
        return load_raw(self.path)


def option(default: Any, help: str, flag: str | None = None, choices: tuple | None = None,
           storage: str | None = None) -> Any:
    """A write option: a dataclass field that the CLI turns into `flag` (default --NAME) under its format.
    storage: the precision table's column its choices name (gguf, onnx): a storage type of another format is
    refused by name (precision.no_counterpart)."""
    return field(default=default, metadata={"help": help, "flag": flag, "choices": choices, "storage": storage})


def calibration_method_option() -> Any:
    """--calibration-method, the same for every format that calibrates its blocks."""
    return option("gptq", "with --calibration: gptq (each matrix's rounding errors compensated in its other"
                  " columns, from its inputs' second moments, layer by layer) or rounding (each block's scale chosen"
                  " by importance-weighted error alone)", choices=("gptq", "rounding"))


@dataclass(frozen=True)
class Options:
    """Base of the formats' write options: values are checked against their choices on construction."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and isinstance(value, str) and value not in choices:
                # names as other tools print them (llama.cpp's Q8_0, Q4_K) are the same names
                same = [c for c in choices if isinstance(c, str) and c.lower() == value.lower()]
                if same:
                    object.__setattr__(self, f.name, value := same[0])
            if choices and value is not None and value not in choices:
                foreign = f.metadata.get("storage") and isinstance(value, str) and \
                    no_counterpart(value, f.metadata["storage"], flag_of(f), choices)
                if foreign:
                    raise RwkvConvertError(foreign)
                raise RwkvConvertError(f"unknown {flag_of(f)} {value!r}; choose from {', '.join(map(str, choices))}")

    @classmethod
    def build(cls, format_name: str, given: dict[str, Any]) -> Options:
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(given) - set(names))
        if unknown:
            takes = ", ".join(names) or "no options"
            raise RwkvConvertError(f"{format_name} does not take {', '.join(unknown)} (it takes {takes})")
        return cls(**{k: v for k, v in given.items() if v is not None})


def flag_of(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


@dataclass(frozen=True)
class NoOptions(Options):
    pass


def always(spec: ModelSpec) -> str | None:
    return None


def per_token_tables_refusal(spec: ModelSpec, runtime: str) -> str | None:
    """Why `runtime` cannot hold a DeepEmbed/DEA model (it has no per-token tables), or None for other models."""
    if not spec.deep_embed and not spec.dea:
        return None
    parts = "per-token tables (DeepEmbed's ffn.s_emb"
    parts += ", DEA's qkv.k_emb/v_emb and its attention)" if spec.dea else ")"
    return (f"this is an RWKV-{spec.variant} model and {runtime} has no {parts}: it cannot be expressed there;"
            " use --to onnx or --to prepared, or run the .pth itself")


@dataclass(frozen=True)
class Format:
    name: str  # as `convert --to` and `rwkv_convert.convert(to=...)` name it
    summary: str  # one line: what the file is for
    runtime: str  # the runtime its users run it in
    sniff: Callable[[Probe], bool]
    read: Callable[[Probe], Checkpoint] | None = None  # original weights: a convert source
    load: Callable[[Probe, str | None], Any] | None = None  # a runnable model (files read -> Model otherwise)
    write: Callable[[Checkpoint, Path, Any], list[Path]] | None = None  # returns the paths written
    options: type[Options] = NoOptions
    supports: Callable[[ModelSpec], str | None] = always
    # what a model needs of the options, where the defaults will not do (hf: a v4 Pile model's tokenizer):
    # None, or the reason convert refuses with them
    needs: Callable[[ModelSpec, Any], str | None] | None = None
    # (path, strategy, streams, split, spec) in `runtime`; it returns None for files with no runtime of their own
    client_run: Callable[..., ClientRun | None] | None = None
    # the precisions the file stores its weights in, as tolerance keys, when reading it back cannot tell
    # (a GGUF is dequantized to fp32 on reading)
    stored: Callable[[Path], set[str]] | None = None
    family: str | None = None  # "safetensors": also `convert --to safetensors --layout NAME` (the older spelling)
    # the file's own tensor types and how many tensors have each, where reading it back loses them (inspect)
    types: Callable[[Path], dict[str, int]] | None = None
    # every file a file of this format consists of, where there are more (an ONNX export's other graph and data)
    files: Callable[[Path], list[Path]] | None = None

    @property
    def target(self) -> str:
        """How the CLI names this format as a convert target (`--to NAME`; a family's formats also answer to the
        older `--to FAMILY --layout NAME`)."""
        return self.name
