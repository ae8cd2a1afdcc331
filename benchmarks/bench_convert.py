"""Conversion to the pip package's format: wall time and peak RSS of rwkv-convert and of the package's own
`convert_and_save_and_exit`, same source, same strategy, same run (each in a fresh process).

    python benchmarks/bench_convert.py       # v6 L24 C1024 V65536 (0.47B, fp16 file) -> "cpu fp16i8"
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_runner import add_checkpoint_args, ensure_checkpoint  # noqa: E402

OURS = """
import sys
import rwkv_convert
rwkv_convert.convert(sys.argv[1], "pip", sys.argv[3], strategy=sys.argv[2])
"""
PACKAGE = """
import os, sys
os.environ["RWKV_JIT_ON"] = "1"; os.environ["RWKV_CUDA_ON"] = "0"
from rwkv.model import RWKV
RWKV(sys.argv[1], strategy=sys.argv[2], verbose=False, convert_and_save_and_exit=sys.argv[3])
"""


def measure(code: str, args: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in GB) of `python -c code args` as a child process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RWKV_")}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code, *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"failed: {proc.stderr.read().decode()[-2000:]}")
    return wall, usage.ru_maxrss / 1024 / 1024  # ru_maxrss is in KB on Linux


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_args(p, "v6", ["v4", "v5.2", "v6"], 24, 1024, "fp16")
    p.add_argument("--strategy", default="cpu fp16i8")
    args = p.parse_args()
    src = ensure_checkpoint(args.version, args.layers, args.embd, args.vocab, args.file_dtype)
    out_dir = src.parent
    rows = {}
    for name, code in (("rwkv-convert", OURS), ("rwkv 0.8.32", PACKAGE)):
        out = out_dir / f"bench-converted-{name.split()[0]}.pth"
        rows[name] = measure(code, [str(src), args.strategy, str(out)])
        rows[name] += (out.stat().st_size / 1e9,)
        out.unlink()
    print(f"\n{src.name} ({src.stat().st_size / 1e9:.2f} GB) -> '{args.strategy}'")
    print(f"{'converter':<14}{'wall s':>9}{'peak RSS GB':>13}{'output GB':>11}")
    for name, (wall, rss, size) in rows.items():
        print(f"{name:<14}{wall:>9.1f}{rss:>13.2f}{size:>11.2f}")


if __name__ == "__main__":
    main()
