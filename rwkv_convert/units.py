"""Byte sizes, read and written the way people type them (decimal units)."""

from __future__ import annotations

import re

from .errors import RwkvConvertError


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n} B"


def parse_size(text: str | int, what: str = "--shard-size") -> int:
    """500MB, 2GB, 1.5G, 1000 -> bytes (decimal units, as Hugging Face's max_shard_size; KiB/MiB/GiB binary).
    `what`: the option named in the error."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(text).upper())
    units = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "M": 1e6, "MB": 1e6, "G": 1e9, "GB": 1e9, "T": 1e12, "TB": 1e12,
             "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30, "TIB": 2 ** 40}
    if not m or m.group(2) not in units:
        raise RwkvConvertError(f"{what} {text!r} is not a size like 500MB or 2GB")
    unit = units[m.group(2)]
    return int(float(m.group(1)) * unit)
