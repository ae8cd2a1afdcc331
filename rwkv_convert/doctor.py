"""`rwkv-convert doctor`: what this machine can do for rwkv-convert, and the command that fixes each missing
piece. Every check is cheap (imports, versions, a tiny kernel self-check): nothing is downloaded or built
that a conversion would not build anyway."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import __version__
from .arch import v7
from .cpu import ops as cpu_ops
from .cuda import build as cuda_kernels
from .kernel_build import kernels_turned_off
from .runtimes import CLIENTS, Client
from .units import human_size, memory_available

PLOT = Client("matplotlib", "matplotlib", "matplotlib", "quality --plot", "pip install 'rwkv-convert[plot]'")


@dataclass
class Check:
    name: str
    status: str  # "ok", "missing" (an optional piece that is absent) or "problem" (present but not working)
    detail: str
    fix: str = ""  # the command that fixes it, where there is one


def _client(client: Client) -> Check:
    version = client.version()
    if version is None:
        return Check(client.distribution, "missing", f"not installed: {client.purpose}", client.install)
    return Check(client.distribution, "ok", f"{version}: {client.purpose}")


def _self_check(kernel, device: str) -> bool | None:
    """The RWKV-7 recurrence kernel against the torch loop on a small random input on `device`: None when the
    kernel cannot run there."""
    generator = torch.Generator().manual_seed(0)
    r, k, v, kk = (torch.randn(9, 2, 16, generator=generator).to(device) for _ in range(4))
    w, a = (torch.rand(9, 2, 16, generator=generator).to(device) for _ in range(2))
    kk, s = torch.nn.functional.normalize(kk, dim=-1), torch.zeros(2, 16, 16, device=device)
    got = kernel(r, w, k, v, kk, a, s)
    if got is None:
        return None
    want = v7.wkv7(r, w, k, v, kk, a, s)
    return all(torch.allclose(x, y, rtol=1e-4, atol=1e-5) for x, y in zip(got, want, strict=True))


def _cpu_kernels() -> Check:
    off = kernels_turned_off()
    if off:
        return Check("CPU kernels", "missing", f"turned off by {off}=1 (the torch loops run instead)", f"unset {off}")
    passed = _self_check(cpu_ops.wkv7, "cpu")
    if passed is None:
        return Check("CPU kernels", "problem", "could not be built (the torch loops run instead: slower)",
                     "install a C compiler (e.g. apt install gcc)")
    if not passed:
        return Check("CPU kernels", "problem", "built, but the self-check against the torch loop failed", "")
    return Check("CPU kernels", "ok", "recurrences built and self-checked against the torch loop")


def _gpu() -> list[Check]:
    """The GPU, nvcc (which compile-checks the kernels even without one) and, on a GPU, the CUDA kernels."""
    cuda_build = torch.version.cuda
    nvcc = shutil.which("nvcc")
    nvcc_check = (Check("nvcc", "ok", _last_line([nvcc, "--version"])) if nvcc else
                  Check("nvcc", "missing", "the CUDA kernels cannot be built (the torch code runs on a GPU instead)",
                        "install the CUDA toolkit that matches torch's CUDA, or set CUDA_HOME"))
    if not torch.cuda.is_available():
        why = "this torch is a CPU build" if cuda_build is None else f"torch (CUDA {cuda_build}) sees no device"
        return [Check("GPU", "missing", f"no CUDA GPU ({why}): everything runs on the CPU; strategies with cuda are"
                      " refused", ""), nvcc_check]
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    checks = [Check("GPU", "ok", f"{len(names)} CUDA device(s): {', '.join(names)} (torch CUDA {cuda_build})"),
              nvcc_check]
    checks.append(_cuda_kernels())
    return checks


def _cuda_kernels() -> Check:
    """The kernels' build and their self-test on this card (cached with the build: see docs/cuda.md)."""
    if os.environ.get("RWKV_CONVERT_NO_CUDA_KERNELS") == "1":
        return Check("CUDA kernels", "missing", "turned off by RWKV_CONVERT_NO_CUDA_KERNELS=1 (the torch code runs on"
                     " the GPU instead: slower)", "unset RWKV_CONVERT_NO_CUDA_KERNELS")
    cuda_kernels.extension()
    report = cuda_kernels.self_test_report()
    if report is None:
        return Check("CUDA kernels", "problem", "not built (the torch code runs on the GPU instead: slower); the"
                     " build's one-line reason is printed above", "scripts/gpu-check.sh shows the build")
    failed = [c for c in report if not c.passed]
    if failed:
        first = failed[0]
        return Check("CUDA kernels", "problem", f"disabled on this card by their self-test: {first.kernel} differs"
                     f" from the torch path by {first.error:.1e} (bound {first.bound:.0e}); the torch code runs"
                     " instead", "report it with the output of scripts/gpu-check.sh")
    return Check("CUDA kernels", "ok", f"built for this card and self-tested: {len(report)} kernels within"
                 f" {max(c.bound for c in report):.0e} of the torch path")


def _last_line(command: list[str]) -> str:
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=30).stdout.strip().splitlines()
    except (OSError, subprocess.TimeoutExpired):
        return "present"
    return out[-1] if out else "present"


def _room(checkpoint: Path | None, where: Path) -> list[Check]:
    """Free memory and disk, against what the checkpoint needs: its fp32 reference run holds the weights in
    fp32 (twice a bf16/fp16 file), and an export writes up to about the file's size again."""
    free_disk = shutil.disk_usage(where).free
    memory = memory_available()
    if checkpoint is None:
        return [Check("memory", "ok", f"{human_size(memory)} available" if memory else "unknown"),
                Check("disk", "ok", f"{human_size(free_disk)} free in {where}")]
    size = checkpoint.stat().st_size
    need_memory = 2 * size
    checks = []
    if memory is None:
        checks.append(Check("memory", "ok", "unknown (no /proc/meminfo)"))
    elif memory < need_memory:
        checks.append(Check("memory", "problem", f"{human_size(memory)} available; a fp32 reference run of"
                            f" {checkpoint.name} ({human_size(size)}) needs about {human_size(need_memory)}",
                            "run it on a machine with more memory"))
    else:
        checks.append(Check("memory", "ok", f"{human_size(memory)} available; a fp32 reference run of"
                            f" {checkpoint.name} needs about {human_size(need_memory)}"))
    if free_disk < size:
        checks.append(Check("disk", "problem", f"{human_size(free_disk)} free in {where}; an export of"
                            f" {checkpoint.name} writes up to {human_size(size)}", "free some space"))
    else:
        checks.append(Check("disk", "ok", f"{human_size(free_disk)} free in {where}; an export writes up to"
                            f" {human_size(size)}"))
    return checks


def run_checks(checkpoint: str | os.PathLike | None = None, where: str | os.PathLike = ".") -> list[Check]:
    """Every check, in the order they are printed."""
    checks = [
        Check("rwkv-convert", "ok", f"{__version__} on Python {platform.python_version()} ({platform.machine()})"),
        Check("torch", "ok", f"{torch.__version__} ({'CUDA ' + torch.version.cuda if torch.version.cuda else 'CPU'}"
              f" build, {torch.get_num_threads()} threads)"),
        *_gpu(),
        _cpu_kernels(),
        *(_client(c) for c in CLIENTS),
        _client(PLOT),
    ]
    if importlib.util.find_spec("onnxruntime") is not None:
        import onnxruntime

        checks.append(Check("onnxruntime providers", "ok", ", ".join(onnxruntime.get_available_providers())))
    checks += _room(Path(checkpoint) if checkpoint else None, Path(where))
    return checks


def format_checks(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = []
    for c in checks:
        mark = {"ok": "ok", "missing": "--", "problem": "!!"}[c.status]
        lines.append(f"{mark}  {c.name.ljust(width)}  {c.detail}" + (f"  [fix: {c.fix}]" if c.fix else ""))
    return "\n".join(lines)


def to_json(checks: list[Check]) -> list[dict]:
    return [asdict(c) for c in checks]

