"""Low-bit GGUF side by side (issue: quantization beyond llama.cpp): for each mix, llama.cpp's own llama-quantize
(plain, and with an importance matrix from llama-imatrix on the same calibration text we use) beside ours
(plain, calibrated, and --target-size at llama.cpp's bytes), every file run in llama.cpp, in one run:
bytes, KL from the fp32 reference and top-1 on the held-out text, and greedy agreement (of the 64 tokens the
reference generates after a prompt, how many each file generates the same before it first differs).

llama-quantize and llama-imatrix are built from the llama-cpp-python sdist's llama.cpp source (see
../shared/reference/gguf.md); give their folder with --llama-bin or LLAMA_CPP_BIN. Without them, the
llama.cpp rows come from llama-cpp-python's llama_model_quantize (no importance matrix).

    python benchmarks/bench_lowbit.py --llama-bin vendor/llama.cpp/build/bin      # bundled v7, Q4_K_M Q3_K_M Q2_K
    python benchmarks/bench_lowbit.py --model bundled:v6 --mix q3_k_m
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

import rwkv_convert
from rwkv_convert.bundled import HELD_OUT_TEXT, bundled_file, model_path
from rwkv_convert.metrics import greedy_agreement
from rwkv_convert.quality import file_figures
from rwkv_convert.runner import Model
from rwkv_convert.runtimes.llama_cpp import LlamaCppSession
from rwkv_convert.tokenizer import default_tokenizer
from rwkv_convert.verify import greedy_continuation

CALIBRATION_TEXT = "calibration.txt"  # what --calibration bundled reads
GREEDY = 64


def llama_tool(folder: Path | None, name: str) -> Path | None:
    path = folder / name if folder else None
    return path if path is not None and path.is_file() else None


def llama_quantize(f16: Path, out: Path, mix: str, binary: Path | None, imatrix: Path | None) -> Path:
    if binary is not None:
        cmd = [str(binary), *(["--imatrix", str(imatrix)] if imatrix else []), str(f16), str(out), mix.upper(), "2"]
        subprocess.run(cmd, check=True, capture_output=True)
        return out
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + mix.upper())
    if llama_cpp.llama_model_quantize(str(f16).encode(), str(out).encode(), params) != 0:
        raise SystemExit(f"llama_model_quantize failed for {mix}")
    return out


def greedy(path: Path, prompt: list[int], continuation: list[int], reference: torch.Tensor) -> int:
    logits = LlamaCppSession(path, n_ctx=2 * (len(prompt) + len(continuation))).logits([prompt + continuation])
    return greedy_agreement(reference, logits, len(prompt), 0.0)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bundled:v7")
    parser.add_argument("--mix", action="append", help="llama-quantize mixes (default q4_k_m, q3_k_m, q2_k)")
    parser.add_argument("--llama-bin", default=os.environ.get("LLAMA_CPP_BIN"), help="llama-quantize, llama-imatrix")
    parser.add_argument("--max-bytes", type=int, default=None, help="score only this much of the held-out text")
    args = parser.parse_args()
    source = model_path(args.model)
    mixes = args.mix or ["q4_k_m", "q3_k_m", "q2_k"]
    folder = Path(args.llama_bin) if args.llama_bin else None
    quantize_bin, imatrix_bin = llama_tool(folder, "llama-quantize"), llama_tool(folder, "llama-imatrix")
    warnings.simplefilter("ignore")  # llama.cpp's files carry our keys: "rewritten by another tool" each time

    ckpt = rwkv_convert.read_checkpoint(source)
    tokenizer = default_tokenizer(ckpt.spec.vocab_size)
    prompt = tokenizer.encode(bundled_file(HELD_OUT_TEXT).read_text(encoding="utf-8")[:400])[:48]
    model = Model(ckpt, "cpu fp32")
    continuation = greedy_continuation(model, prompt, GREEDY)
    reference = model.forward(prompt + continuation, None, full_output=True)[0].float()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        f16 = rwkv_convert.convert(source, "gguf", work / "f16.gguf", quant="f16")[0]
        imatrix = None
        if imatrix_bin is not None:
            imatrix = work / "imatrix.gguf"
            subprocess.run([str(imatrix_bin), "-m", str(f16), "-f", str(bundled_file(CALIBRATION_TEXT)), "-c", "512",
                            "-o", str(imatrix), "--no-ppl"], check=True, capture_output=True)

        def row(mix: str, maker: str, path: Path) -> None:
            fig = file_figures(source, path, max_bytes=args.max_bytes)
            rows.append((mix, maker, path.stat().st_size, fig["kl"], fig["top1"],
                         greedy(path, prompt, continuation, reference)))
            print(f"{mix:8} {maker:34} {rows[-1][2]:>10,} KL {fig['kl']:.4g}", flush=True)

        for mix in mixes:
            theirs = llama_quantize(f16, work / f"{mix}-llama.gguf", mix, quantize_bin, None)
            row(mix, "llama-quantize", theirs)
            if imatrix is not None:
                row(mix, "llama-quantize --imatrix", llama_quantize(f16, work / f"{mix}-imatrix.gguf", mix,
                                                                     quantize_bin, imatrix))
            row(mix, "rwkv-convert", rwkv_convert.convert(source, "gguf", work / f"{mix}.gguf", quant=mix)[0])
            row(mix, "rwkv-convert --calibration", rwkv_convert.convert(
                source, "gguf", work / f"{mix}-cal.gguf", quant=mix, calibration="bundled")[0])
            row(mix, "rwkv-convert --target-size (theirs)", rwkv_convert.convert(
                source, "gguf", work / f"{mix}-size.gguf", quant=mix, calibration="bundled",
                target_size=str(theirs.stat().st_size))[0])

    print(f"\n{source.name}: every file run in llama.cpp; KL and top-1 on the bundled held-out text"
          f"{f' (first {args.max_bytes} bytes)' if args.max_bytes else ''}; greedy: of {GREEDY} tokens")
    print(f"{'mix':8} {'maker':36} {'bytes':>10} {'KL':>10} {'top-1':>7} {'greedy':>7}  KL / llama.cpp's best")
    for mix in mixes:
        best = min(r[3] for r in rows if r[0] == mix and r[1].startswith("llama"))
        for r in (r for r in rows if r[0] == mix):
            print(f"{r[0]:8} {r[1]:36} {r[2]:>10,} {r[3]:>10.4g} {r[4]:>7.1%} {r[5]:>7}  {r[3] / best:.2f}x")


if __name__ == "__main__":
    main()
