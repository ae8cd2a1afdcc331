"""What each scheme costs the bundled trained models, every file run in its own runtime (rwkv-convert quality
on both models, one run): the table docs/quality.md and the README report.

    python benchmarks/bench_quality.py                     # v7 and v6, all schemes, the whole held-out text
    python benchmarks/bench_quality.py --versions v7 --max-bytes 16384 --schemes fp16,gguf-q4_0
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

from rwkv_convert import quality
from rwkv_convert.bundled import trained_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--versions", default="v7,v6")
    parser.add_argument("--schemes", default=None)
    parser.add_argument("--max-bytes", type=int, default=None)
    parser.add_argument("--window", type=int, default=1024)
    args = parser.parse_args()
    print(f"# {platform.processor() or platform.machine()}, python {platform.python_version()}")
    for version in args.versions.split(","):
        started = time.monotonic()
        schemes = quality.parse_schemes(args.schemes, full=True)
        report = quality.measure(trained_model(version), None, schemes, args.window, args.max_bytes,
                                 lambda line: print(f"  {line}", file=sys.stderr) if "window" not in line else None)
        print(quality.table(report))
        print(f"({version}: {time.monotonic() - started:.0f} s for {len(report.results)} schemes)\n")


if __name__ == "__main__":
    main()
