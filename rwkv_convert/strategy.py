"""Strategy strings (`cuda fp16i8 *10 -> cuda fp16`): parsing with precise errors, and the `rwkv` pip
package's layer allocation over n_layer + 1 slots (the last slot is ln_out + head)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch

from .errors import RwkvConvertError

DEFAULT_RESCALE_LAYER = 6
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# [0-9], not \d: Python's \d takes any Unicode digit ("*١" would be a layer count)
_DEVICE = re.compile(r"^(cpu|mps|cuda(:[0-9]{1,4})?)$")  # a device index of at most 4 digits
_COUNT = re.compile(r"^\*([0-9]+)(\+?)$")


@dataclass(frozen=True)
class Segment:
    device: str
    dtype: str  # activation dtype name: fp32 / fp16 / bf16
    int8: bool
    count: int | None  # None: takes a share of the remaining slots
    stream: bool

    def __str__(self) -> str:
        text = f"{self.device} {self.dtype}{'i8' if self.int8 else ''}"
        if self.count is not None:
            text += f" *{self.count}{'+' if self.stream else ''}"
        return text


@dataclass(frozen=True)
class Placement:
    """Where one slot (a layer, or the head) runs and how its weights are stored."""

    device: str
    atype: torch.dtype
    weights: str  # "fp32" | "fp16" | "bf16" | "i8"
    stream: bool = False
    segment: int = 0  # index of the strategy segment that placed it

    @property
    def precision(self) -> str:
        """The weights' precision as verification's tolerance table names it: bf16 activations make int8 a
        distinct, less precise scheme."""
        if self.weights == "i8":
            return "bf16i8" if self.atype == torch.bfloat16 else "i8"
        return self.weights


@dataclass(frozen=True)
class Strategy:
    segments: tuple[Segment, ...]

    def __str__(self) -> str:  # the pip package's normalised form, recorded in converted files
        return " -> ".join(str(s) for s in self.segments)

    @property
    def uses_fp16(self) -> bool:
        return any(s.dtype == "fp16" for s in self.segments)

    def rescale_layer(self) -> int:
        """The fp16 rescale interval, as the pip package chooses it: 6 whenever the string has fp16,
        RWKV_RESCALE_LAYER overriding it (0 disables). Versions without a rescale (RWKV-7) ignore it: ask
        rwkv_convert.arch.rescale_interval."""
        env = os.environ.get("RWKV_RESCALE_LAYER", "").strip()
        if not env:
            return DEFAULT_RESCALE_LAYER if self.uses_fp16 else 0
        if not (env.isascii() and env.isdigit()):
            raise RwkvConvertError(f"RWKV_RESCALE_LAYER={env!r} is not a whole number of layers (0 turns the fp16"
                                   " rescale off); fix or unset it")
        return int(env)


def _bad(text: str, token: str, where: str, expected: str) -> RwkvConvertError:
    return RwkvConvertError(f'bad strategy "{text}": {token!r} {where} is not {expected}')


def parse_strategy(text: str) -> Strategy:
    if not isinstance(text, str) or not text.strip():
        raise RwkvConvertError('empty strategy; use e.g. "cpu fp32" or "cuda fp16i8 *10 -> cuda fp16"')
    segments = []
    for n, part in enumerate(text.split("->"), start=1):
        tokens = part.split()
        where = f"(segment {n})"
        if not tokens:
            raise RwkvConvertError(f'bad strategy "{text}": segment {n} is empty; expected "DEVICE DTYPE [*N[+]]"')
        if not _DEVICE.match(tokens[0]):
            raise _bad(text, tokens[0], where, "a device; expected cpu, cuda, cuda:N or mps")
        if len(tokens) < 2:
            raise RwkvConvertError(f'bad strategy "{text}": segment {n} "{part.strip()}" has no dtype;'
                                   " expected fp32, fp16 or bf16 (optionally with i8, e.g. fp16i8)")
        dtype_token = tokens[1]
        base, suffix = dtype_token[:4], dtype_token[4:]
        if base not in DTYPES or suffix not in ("", "i8"):
            if base in DTYPES and re.fullmatch(r"i[0-9]+", suffix):
                raise _bad(text, dtype_token, where,
                           f"supported: {suffix} weights do not exist; use {base}i8 or {base}")
            raise _bad(text, dtype_token, where, "a dtype; expected fp32, fp16 or bf16, optionally with i8 (fp16i8)")
        count, stream = None, False
        if len(tokens) >= 3:
            m = _COUNT.match(tokens[2])
            if not m:
                raise _bad(text, tokens[2], where, "a layer count; expected *N or *N+ (e.g. *10, *10+)")
            count, stream = int(m.group(1)), bool(m.group(2))
        if len(tokens) > 3:
            raise _bad(text, tokens[3], where, 'expected; a segment is "DEVICE DTYPE [*N[+]]", join segments with ->')
        segments.append(Segment(tokens[0], base, suffix == "i8", count, stream))
    if sum(s.stream for s in segments) > 1:
        raise RwkvConvertError(f'bad strategy "{text}": only one segment may stream (*N+)')
    return Strategy(tuple(segments))


def allocate(strategy: Strategy, n_layer: int) -> list[Placement]:
    """Placement of each of the n_layer + 1 slots, as the pip package allocates them, minus its bugs:
    an explicit `*0` neither crashes nor receives leftover slots."""
    segs = strategy.segments
    total = n_layer + 1
    counts = [0] * len(segs)
    allocated = 0
    stream_index = next((i for i, s in enumerate(segs) if s.stream), -1)
    for i, seg in enumerate(segs):
        if seg.count is None:
            continue
        counts[i] = min(seg.count, total - allocated)
        allocated += counts[i]
        if allocated >= total:
            break
    free = [i for i, s in enumerate(segs) if s.count is None]
    if stream_index >= 0 and free:
        seg = segs[free[0]]
        raise RwkvConvertError(
            f'bad strategy "{strategy}": segment {free[0] + 1} "{seg}" has no *N, but segment {stream_index + 1}'
            f' "{segs[stream_index]}" streams all remaining layers, so it would get none (the rwkv package'
            f' silently leaves it empty); give it a count, e.g. "{seg} *1"')
    streamed = 0
    if stream_index < 0:
        for j, i in enumerate(free):  # later segments get the larger share, as in the package
            counts[i] = (total - allocated) // (len(free) - j)
            allocated += counts[i]
        if allocated < total:
            last = max((i for i, s in enumerate(segs) if s.count != 0), default=len(segs) - 1)
            counts[last] += total - allocated
    elif allocated < total:
        streamed = total - allocated
        counts[stream_index] += streamed
    placements: list[Placement] = []
    for i, seg in enumerate(segs):
        first_streamed = counts[i] - streamed if i == stream_index else counts[i]
        for n in range(counts[i]):
            placements.append(Placement(seg.device, DTYPES[seg.dtype], "i8" if seg.int8 else seg.dtype,
                                        stream=n >= first_streamed, segment=i))
    return placements[:total]
