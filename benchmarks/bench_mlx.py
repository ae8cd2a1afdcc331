"""MLX 4-bit (and 3-bit) groups: mlx-lm's own converter (`mlx_lm.convert -q`, on our fp32 hf export of the same
model) beside rwkv-convert's `--to mlx --quant qN`, plain and `--calibration bundled` (GPTQ), in one run. Every
directory is run in mlx-lm on the bundled held-out text (rwkv-convert quality's figures: KL from the fp32
reference, top-1 agreement, bits per byte) and the ratio of each KL to mlx-lm's own is printed.

    python benchmarks/bench_mlx.py                       # the bundled trained RWKV-7, 4 and 3 bits
    python benchmarks/bench_mlx.py --model RWKV-x070-World-0.1B.pth --bits 4 --max-bytes 8192
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import rwkv_convert
from rwkv_convert.bundled import model_path
from rwkv_convert.quality import file_figures


def size(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.glob("*.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bundled:v7")
    parser.add_argument("--bits", type=int, action="append", help="4 and 3 unless given")
    parser.add_argument("--group-size", type=int, default=64)
    # mlx-lm's RWKV-7 on a CPU steps every token through Python (about 25 ms a token on the bundled model)
    parser.add_argument("--max-bytes", type=int, default=2048, help="score this much of the text (default 2048)")
    args = parser.parse_args()
    import mlx_lm

    source = model_path(args.model)
    rows = [("bits", "maker", "bytes", "KL", "KL / mlx-lm's", "top-1", "bits/byte")]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        rwkv_convert.convert(source, "hf", folder / "hf")  # the source's dtype, as ours keeps it by default
        for bits in args.bits or [4, 3]:
            made = {"mlx_lm.convert": folder / f"theirs-{bits}", "rwkv-convert": folder / f"plain-{bits}",
                    "rwkv-convert --calibration": folder / f"cal-{bits}"}
            mlx_lm.convert(str(folder / "hf"), str(made["mlx_lm.convert"]), quantize=True, q_bits=bits,
                           q_group_size=args.group_size, trust_remote_code=True)
            options = {"quant": f"q{bits}", "group_size": args.group_size}
            rwkv_convert.convert(source, "mlx", made["rwkv-convert"], **options)
            rwkv_convert.convert(source, "mlx", made["rwkv-convert --calibration"], calibration="bundled", **options)
            figures = {maker: file_figures(source, path, max_bytes=args.max_bytes) for maker, path in made.items()}
            theirs = figures["mlx_lm.convert"]["kl"]
            for maker, path in made.items():
                f = figures[maker]
                rows.append((str(bits), maker, f"{size(path):,}", f"{f['kl']:.5f}", f"{f['kl'] / theirs:.3f}",
                             f"{f['top1']:.1%}", f"{f['bits_per_byte']:.4f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)))


if __name__ == "__main__":
    main()
