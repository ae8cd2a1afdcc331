"""Where tensors' bytes lie in a file's data section: checks that the header's offsets can be right (no format
here keeps a checksum of its offsets, and a damaged one would read other bytes without a word)."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from pathlib import Path

import torch

from .checkpoint import drop_file_pages
from .errors import RwkvConvertError, check_crc32


def check_spans(path: Path, spans: list[tuple[int, int, str]], packed_size: int | None = None) -> None:
    """spans: (begin, end, name) of each non-empty tensor. Raises when two overlap; with packed_size (formats
    whose data has no gaps: safetensors), also on a gap or a section the tensors do not cover exactly."""
    spans = sorted(spans)
    for (_, end_a, a), (begin_b, _, b) in zip(spans, spans[1:], strict=False):
        if begin_b < end_a:
            raise RwkvConvertError(f"{path}: tensors {a!r} and {b!r} overlap in the data section (corrupt file)")
        if packed_size is not None and begin_b > end_a:
            raise RwkvConvertError(f"{path}: the data section has a gap between tensors {a!r} and {b!r} (corrupt"
                                   " file: its data is contiguous)")
    # A safetensors header length off by a few bytes that still parses (trailing spaces) shifts every tensor.
    covered = (spans[0][0], spans[-1][1]) if spans else (0, 0)
    if packed_size is not None and covered != (0, packed_size):
        raise RwkvConvertError(f"{path}: its tensors cover bytes {covered[0]:,}-{covered[1]:,} of a"
                               f" {packed_size:,}-byte data section; the header length or offsets are damaged")


def check_mapped_crcs(path: Path, mapping, spans: Iterable[tuple[str, int, int, int]]) -> None:
    """Each (what, begin, end, crc) byte range of a file mapping against its CRC-32, in file order; each range's
    pages are dropped once checked, so memory does not grow with the file."""
    with memoryview(mapping) as view, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "buffer is not writable": the view is only read
        for what, begin, end, crc in sorted(spans, key=lambda s: s[1]):
            check_crc32(path, what, view[begin:end], crc)
            if end > begin:
                drop_file_pages(torch.frombuffer(mapping, dtype=torch.uint8, count=end - begin, offset=begin))
