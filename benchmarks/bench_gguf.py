"""GGUF export speed and memory: a random v7 L24 C2048 V65536 (1.5B) checkpoint to Q8_0 and F16, each in a
fresh process: wall time, peak RSS, output size.

    python benchmarks/bench_gguf.py                      # v7 L24 C2048 V65536, bf16 file
    python benchmarks/bench_gguf.py --layers 12 --embd 768
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_convert import measure  # noqa: E402
from bench_runner import add_checkpoint_args, ensure_checkpoint  # noqa: E402

CODE = """
import sys
import rwkv_convert
rwkv_convert.convert(sys.argv[1], "gguf", sys.argv[3], quant=sys.argv[2])
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_args(p, "v7", ["v6", "v7"], 24, 2048, "bf16")
    p.add_argument("--quants", default="q8_0,f16")
    args = p.parse_args()
    src = ensure_checkpoint(args.version, args.layers, args.embd, args.vocab, args.file_dtype)
    print(f"\n{src.name} ({src.stat().st_size / 1e9:.2f} GB)")
    print(f"{'quant':<8}{'wall s':>9}{'peak RSS GB':>13}{'output GB':>11}")
    for quant in args.quants.split(","):
        out = src.parent / f"bench-{quant}.gguf"
        wall, rss = measure(CODE, [str(src), quant, str(out)])
        print(f"{quant:<8}{wall:>9.1f}{rss:>13.2f}{out.stat().st_size / 1e9:>11.2f}")
        out.unlink()


if __name__ == "__main__":
    main()
