"""Byte sizes, read and written the way people type them (decimal units), and the memory there is to hold them."""

from __future__ import annotations

import re
from pathlib import Path

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


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def memory_available() -> int | None:
    """Bytes this process may still allocate: the kernel's MemAvailable, lowered by a cgroup's memory.max and
    by this process's RLIMIT_AS/RLIMIT_DATA (a CI runner's limits); None where none of these can be read."""
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    limit, used = _read_int("/sys/fs/cgroup/memory.max"), _read_int("/sys/fs/cgroup/memory.current")
    if limit is not None and used is not None:
        found.append(max(limit - used, 0))
    try:
        import resource
    except ImportError:  # not a Unix
        resource = None
    if resource is not None:
        for which in ("RLIMIT_AS", "RLIMIT_DATA"):
            soft = resource.getrlimit(getattr(resource, which))[0] if hasattr(resource, which) else -1
            if soft != resource.RLIM_INFINITY and soft > 0:
                found.append(soft)  # the limit itself: what is already used is small next to what is asked for
    return min(found) if found else None


def check_memory(needed: int, what: str, fix: str) -> None:
    """Refuse, in one line and before allocating, work whose estimated peak exceeds the memory there is."""
    available = memory_available()
    if available is not None and needed > available:
        raise RwkvConvertError(f"{what} needs about {human_size(needed)} of memory and {human_size(available)} is"
                               f" available; {fix}")
