"""Each CUDA kernel against the torch code it replaces, on small random inputs (every head size the dispatch
takes, fixed and per-token decay, int8 rows that are no multiple of 4), once per card: the verdict is cached
beside the build, and a kernel that disagrees beyond its bound turns the kernels off for that card with one
line on stderr, so the torch path runs. The same checks run the CPU build of the kernels in the tests."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..arch import v4, v5, v7
from ..atomic import AtomicOutput
from . import HEAD_SIZES

BOUND = 2e-3  # max |kernel - torch| / max(1, max |torch|): fp32 sums in another order, and fast-math exp on GPUs


@dataclass
class KernelCheck:
    kernel: str
    error: float  # the worst relative difference over the kernel's cases (inf: it failed to run)
    bound: float = BOUND
    detail: str = ""

    @property
    def passed(self) -> bool:
        return self.error <= self.bound


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    scale = max(1.0, want.abs().max().item())
    error = ((got.float() - want.float()).abs().max().item()) / scale
    return error if error == error else float("inf")  # NaN counts as the worst


def _cases(device: str, seed: int) -> dict[str, list[Callable[[object], tuple[list, list]]]]:
    """Per kernel: functions of an extension giving (kernel outputs, torch outputs) for one random case. The
    extension's own functions are called, as ops.py calls them, on copies of the states they update."""
    g = torch.Generator().manual_seed(seed)
    stream = torch.cuda.current_stream().cuda_stream if device == "cuda" else 0

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device)

    def uniform(*shape):
        return torch.rand(*shape, generator=g).to(device)

    def wkv4_case(ext, T=3, C=130):  # 130: two blocks, the second partly past C
        w, u = -torch.exp(rand(C)), rand(C)
        k, v = rand(T, C), rand(T, C)
        state = [rand(C), rand(C).abs() + 0.1, rand(C)]
        updated = [t.clone() for t in state]
        y = ext.wkv4(w, u, k, v, *updated, stream)
        return [y, *updated], list(v4.wkv4(w, u, k, v, *state))

    def wkv5_case(ext, N, per_token, T=2, H=2):
        r, k, v = rand(T, H, N), rand(T, H, N), rand(T, H, N)
        w = uniform(T, H, N) if per_token else uniform(H, N)  # the kernel's layouts: [T, H, N] or [H, N]
        u, s = rand(H, N), rand(H, N, N, scale=0.3)
        updated = s.clone()
        y = ext.wkv5(r, k, v, w, u, updated, stream)
        return [y, updated], list(v5.wkv(r, k, v, w.unsqueeze(-1), u.unsqueeze(-1), s))

    def wkv7_case(ext, N, kernel="wkv7", T=2, H=2, decay=0.6):
        r, k, v = rand(T, H, N), rand(T, H, N), rand(T, H, N)
        w = torch.exp(-decay * uniform(T, H, N))
        kk = torch.nn.functional.normalize(rand(T, H, N), dim=-1)
        a, s = uniform(T, H, N), rand(H, N, N, scale=0.3)
        updated = s.clone()
        y = getattr(ext, kernel)(r, w, k, v, kk, a, updated, stream)
        return [y, updated], list(v7.wkv7(r, w, k, v, kk, a, s))

    def int8_parts(rows, cols):  # rows: no multiple of 4
        q = torch.randint(0, 256, (rows, cols), generator=g, dtype=torch.uint8).to(device)
        companions = [rand(cols, scale=0.01), uniform(cols) * 0.01, rand(rows, scale=0.01), uniform(rows) * 0.01]
        mx, rx, my, ry = companions
        # the pip package's scheme (quant/rwkv_int8.py): W[i, o] = (q + 0.5) ry[i] rx[o] + my[i] + mx[o]
        weight = (q.float() + 0.5) * ry.unsqueeze(1) * rx + my.unsqueeze(1) + mx
        return q, companions, weight

    def int8_gemv_case(ext):
        q, companions, weight = int8_parts(67, 36)
        x = rand(q.shape[0])
        return [ext.int8_gemv(x, q, *companions, stream)], [x @ weight]

    def int8_dequant_case(ext):
        q, companions, weight = int8_parts(70, 40)
        return [ext.int8_dequant(q, *companions, torch.float32, stream)], [weight]

    return {
        "wkv4": [wkv4_case],
        "wkv5": [lambda ext, n=n, p=p: wkv5_case(ext, n, p) for n in HEAD_SIZES for p in (False, True)],
        "wkv7": [lambda ext, n=n: wkv7_case(ext, n) for n in HEAD_SIZES],
        # 41 tokens: a whole chunk and a part one (of 32; of 16 at N=128: three); decays down to RWKV-7's strongest
        "wkv7_chunked": [lambda ext, n=n: wkv7_case(ext, n, "wkv7_chunked", T=41, decay=0.6065) for n in HEAD_SIZES],
        "int8_gemv": [int8_gemv_case],
        "int8_dequant": [int8_dequant_case],
    }


def check_kernels(ext, device: str, seed: int = 0) -> list[KernelCheck]:
    """Every kernel of `ext` (the CUDA extension, or on_cpu.KernelsOnCpu) against torch on `device`."""
    checks = []
    for kernel, cases in _cases(device, seed).items():
        worst, detail = 0.0, ""
        for case in cases:
            try:
                got, want = case(ext)
            except Exception as e:  # a kernel that cannot run counts as failed, with its reason
                worst, detail = float("inf"), f"{type(e).__name__}: {str(e).strip()[:160]}"
                break
            worst = max([worst] + [relative_error(a, b) for a, b in zip(got, want, strict=True)])
        checks.append(KernelCheck(kernel, worst, detail=detail))
    return checks


def verdict_name(card: str) -> str:
    """The file name of a card's cached verdict, kept beside (or in) the build it is about."""
    return f"selftest-{re.sub(r'[^A-Za-z0-9._-]+', '_', card).strip('_')}.json"


def trusted(ext, device: str, card: str, path: Path) -> tuple[bool, list[KernelCheck]]:
    """Whether the kernels may run on this card: the verdict cached in `path`, or the self-test run now and
    cached there. On a failure, one line on stderr."""
    try:
        checks = [KernelCheck(**c) for c in json.loads(path.read_text())["checks"]]
    except (OSError, ValueError, KeyError, TypeError):
        checks = check_kernels(ext, device)
        try:
            with AtomicOutput(path) as out:
                out.temp().write_text(json.dumps({"card": card, "checks": [asdict(c) for c in checks]}, indent=1))
        except OSError:
            pass  # an unwritable cache: the verdict holds for this process only
    failed = [c for c in checks if not c.passed]
    if failed:
        first = failed[0]
        how = first.detail or f"differs from the torch path by {first.error:.1e} (bound {first.bound:.0e})"
        print(f"rwkv-convert: CUDA kernels disabled on {card}: {first.kernel} {how} in the self-test; the torch"
              f" path runs instead (verdict cached in {path})", file=sys.stderr)
    return not failed, checks


def format_checks(checks: list[KernelCheck], card: str) -> str:
    """The self-test as a table (scripts/gpu-check.sh prints it)."""
    rows = [f"| kernel vs torch on {card} | worst relative difference | bound | |", "|---|---|---|---|"]
    rows += [f"| {c.kernel} | {c.error:.2e} | {c.bound:.0e} | {'ok' if c.passed else 'FAILED ' + c.detail} |"
             for c in checks]
    return "\n".join(rows)
