"""Per-tensor quantization types that fit a size budget: each tensor's candidate types are measured (bytes,
and the importance-weighted squared error they add to its outputs on a calibration text), and the tensors
whose next step down costs the least error per byte saved are stepped down until the file fits."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import RwkvConvertError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(%|b|kb|mb|gb|kib|mib|gib)?\s*$", re.IGNORECASE)
_UNITS = {None: 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_target(text: str, reference_bytes: int) -> int:
    """'60%' (of reference_bytes) or a size ('3.5MB', '2GiB', '1200000') -> bytes."""
    m = _SIZE.match(text)
    if not m:
        raise RwkvConvertError(f"--target-size {text!r} is neither a percentage (60%) nor a size (3.5MB, 2GiB)")
    value, unit = float(m.group(1)), (m.group(2) or "").lower() or None
    if unit == "%":
        if not 0 < value <= 100:
            raise RwkvConvertError(f"--target-size {text}: a percentage of the F16 file lies in (0, 100]")
        return int(reference_bytes * value / 100)
    return int(value * _UNITS[unit])


@dataclass(frozen=True)
class Option:
    qtype: str
    nbytes: int
    error: float  # predicted: sum over the output of the importance-weighted squared weight error


def plan(candidates: dict[str, list[Option]], fixed_bytes: int, budget: int) -> dict[str, Option]:
    """{tensor: its chosen option} with fixed_bytes + the chosen bytes <= budget, stepping down greedily by the
    least error added per byte saved. Dominated options (more bytes and more error) are never chosen."""
    ladders = {}
    for name, options in candidates.items():
        ladder: list[Option] = []  # bytes falling, error rising
        for opt in sorted(options, key=lambda o: (-o.nbytes, o.error)):
            while ladder and ladder[-1].error >= opt.error:
                ladder.pop()  # as good or better for fewer bytes: the larger one is never worth it
            ladder.append(opt)
        ladders[name] = ladder
    chosen = {name: 0 for name in ladders}
    total = fixed_bytes + sum(ladders[n][0].nbytes for n in ladders)
    smallest = fixed_bytes + sum(ladders[n][-1].nbytes for n in ladders)
    if smallest > budget:
        raise RwkvConvertError(f"--target-size: {budget:,} bytes is below the smallest this model can be with these"
                               f" types ({smallest:,} bytes)")
    while total > budget:
        def cost(name):
            i, ladder = chosen[name], ladders[name]
            step, nxt = ladder[i], ladder[i + 1]
            return (nxt.error - step.error) / max(step.nbytes - nxt.nbytes, 1)

        movable = [n for n in ladders if chosen[n] + 1 < len(ladders[n])]
        name = min(movable, key=cost)
        total -= ladders[name][chosen[name]].nbytes - ladders[name][chosen[name] + 1].nbytes
        chosen[name] += 1
    return {name: ladders[name][i] for name, i in chosen.items()}
