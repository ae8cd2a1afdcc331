"""Compiling a C or C++ source of rwkv-convert into a shared library, cached under the kernels directory by the
hash of the sources, the compiler's flags and the CPU (flags and machine), written atomically so that two
processes building the same library never load a half-written one."""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
from pathlib import Path

from .atomic import AtomicOutput
from .paths import kernels_dir

# Set to 1, the C kernels are not built and the torch loops run. The second name is the one before the C code was
# called "kernels" rather than "native" (still honoured).
KERNELS_OFF_VARIABLES = ("RWKV_CONVERT_NO_KERNELS", "RWKV_CONVERT_NO_NATIVE")


def kernels_turned_off() -> str | None:
    """The environment variable that turns the C kernels off, where one is set to 1."""
    return next((name for name in KERNELS_OFF_VARIABLES if os.environ.get(name) == "1"), None)


def cpu_signature() -> str:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor()
    return hashlib.sha256(flags.encode()).hexdigest()[:12]


def build_library(source: Path, compiler: str, flags: list[str], depends: tuple[Path, ...] = (),
                  libraries: tuple[str, ...] = ()) -> Path:
    """The library built from `source` (and the headers in `depends`, part of its cache key), linked with
    `libraries` (after the source, as linkers want them). Raises RuntimeError with the compiler's last line when
    it fails."""
    key = hashlib.sha256()
    for part in (source, *depends):
        key.update(part.read_bytes())
    key.update(" ".join([compiler, *flags, *libraries, cpu_signature(), platform.machine()]).encode())
    folder = kernels_dir()
    folder.mkdir(parents=True, exist_ok=True)
    lib_path = folder / f"{source.stem}-{key.hexdigest()[:16]}.so"
    if not lib_path.exists():
        with AtomicOutput(lib_path) as out:  # another process may build the same library at the same time
            proc = subprocess.run([compiler, *flags, str(source), *libraries, "-o", str(out.temp())],
                                  capture_output=True, text=True)
            if proc.returncode:
                last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"
                raise RuntimeError(f"{compiler} failed: {last}")
    return lib_path
