"""llama-quantize's K-quant mixes (Q4_K_M, Q4_K_S, Q5_K_M, Q5_K_S, Q3_K_M, Q2_K) written by rwkv-convert straight
from the checkpoint, beside llama.cpp's own llama-quantize run on our F16 GGUF of the same model (through
llama-cpp-python's llama_model_quantize), in one run: file size, whether every tensor has the same type, and
KL / top-1 / greedy agreement against the fp32 reference, both files run in llama.cpp (verify).

    python benchmarks/bench_kquant_mixes.py                  # the bundled trained v7 and v6
    python benchmarks/bench_kquant_mixes.py --model RWKV-x070-World-0.1B.pth --tokens 128
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import rwkv_convert
from rwkv_convert.bundled import model_path
from rwkv_convert.verify import verify

MIXES = ("q4_k_m", "q4_k_s", "q5_k_m", "q5_k_s", "q3_k_m", "q2_k")


def llama_quantize(f16: Path, out: Path, mix: str) -> Path:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + mix.upper())
    params.nthread = 2
    if llama_cpp.llama_model_quantize(str(f16).encode(), str(out).encode(), params) != 0:
        raise SystemExit(f"llama_model_quantize failed for {mix}")
    return out


def types(path: Path) -> dict[str, str]:
    import gguf

    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", help="checkpoints (default: bundled:v7 and bundled:v6)")
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    models = args.model or ["bundled:v7", "bundled:v6"]
    rows = [("model", "mix", "maker", "bytes", "same types", "KL", "top-1", "greedy")]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for model in models:
            source = model_path(model)
            f16 = rwkv_convert.convert(source, "gguf", folder / f"{source.stem}-f16.gguf", quant="f16")[0]
            for mix in MIXES:
                ours = rwkv_convert.convert(source, "gguf", folder / f"{source.stem}-{mix}-ours.gguf", quant=mix)[0]
                theirs = llama_quantize(f16, folder / f"{source.stem}-{mix}-llama.gguf", mix)
                same = "yes" if types(ours) == types(theirs) else "no"
                for maker, path in (("rwkv-convert", ours), ("llama-quantize", theirs)):
                    report = verify(path, source, tokens=args.tokens)
                    rows_ = list(report.rows.values())
                    kl = max(m.kl for m in rows_)
                    top1 = min(m.top1_all for m in rows_)
                    greedy = min((m.greedy, m.greedy_of) for m in rows_ if m.greedy is not None)
                    rows.append((source.stem, mix.upper(), maker, f"{path.stat().st_size:,}", same, f"{kl:.4g}",
                                 f"{top1:.1%}", f"{greedy[0]}/{greedy[1]}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))


if __name__ == "__main__":
    main()
