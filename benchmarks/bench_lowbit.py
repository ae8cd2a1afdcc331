"""Low-bit quantization side by side (issue: quantization beyond llama.cpp), in one run and one table: each of our
schemes beside the quantizers users have today, every file run in its own client, on the bundled trained models.

- GGUF, run in llama.cpp: llama.cpp's own llama-quantize (plain, and with an importance matrix from llama-imatrix
  on the same calibration text we use) beside ours (plain, calibrated, and --target-size at llama.cpp's bytes:
  with the LoRA factors planned too, and kept F32 as llama-quantize keeps them).
- MLX, run in mlx-lm: mlx-lm's own `mlx_lm.convert -q` (on our hf export) beside ours (plain and calibrated).
- ONNX, run in onnxruntime: onnxruntime's own MatMulNBits quantizers (RTN, HQQ, GPTQ with the same calibration
  text) on our float export beside ours (plain and calibrated); all 4-bit blocks of 32, computing in int8
  (accuracy_level 4, our default).

Figures: bytes, KL from the fp32 reference and top-1 on the held-out text, greedy agreement (of the 64 tokens the
reference generates after a prompt, how many each file generates the same before it first differs), and KL as a
multiple of the best of the other tools in the same group.

llama-quantize and llama-imatrix are built from the llama-cpp-python sdist's llama.cpp source (see
../shared/reference/gguf.md); give their folder with --llama-bin or LLAMA_CPP_BIN. Without them the llama.cpp rows
come from llama-cpp-python's llama_model_quantize (no importance matrix).

    python benchmarks/bench_lowbit.py --llama-bin vendor/llama.cpp/build/bin      # bundled v7 and v6, everything
    python benchmarks/bench_lowbit.py --model bundled:v6 --formats gguf --mix q3_k_m
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import rwkv_convert
from rwkv_convert.bundled import HELD_OUT_TEXT, bundled_file, model_path
from rwkv_convert.calibration import BUNDLED, calibration_tokens
from rwkv_convert.errors import RwkvConvertError
from rwkv_convert.metrics import greedy_agreement
from rwkv_convert.quality import file_figures, file_logits
from rwkv_convert.runner import Model
from rwkv_convert.tokenizer import default_tokenizer
from rwkv_convert.verify import greedy_continuation

CALIBRATION_TEXT = "calibration.txt"  # what --calibration bundled reads
GREEDY = 64
BLOCK = 32  # MatMulNBits block of our int4 exports; onnxruntime's quantizers are given the same


@dataclass
class Row:
    model: str
    group: str  # the files compared with each other: format and size class
    maker: str
    nbytes: int
    kl: float
    top1: float
    greedy: int
    ours: bool


class Bench:
    def __init__(self, source: Path, max_bytes: int | None):
        self.source, self.max_bytes, self.rows = source, max_bytes, []
        ckpt = rwkv_convert.read_checkpoint(source)
        self.ckpt = ckpt
        tokenizer = default_tokenizer(ckpt.spec.vocab_size)
        self.prompt = tokenizer.encode(bundled_file(HELD_OUT_TEXT).read_text(encoding="utf-8")[:400])[:48]
        model = Model(ckpt, "cpu fp32")
        continuation = greedy_continuation(model, self.prompt, GREEDY)
        self.stream = self.prompt + continuation
        self.reference = model.forward(self.stream, None, full_output=True)[0].float()

    def add(self, group: str, maker: str, path: Path, nbytes: int, ours: bool, max_bytes: int | None = None) -> None:
        fig = file_figures(self.source, path, max_bytes=max_bytes or self.max_bytes)
        greedy = greedy_agreement(self.reference, file_logits(path, self.stream), len(self.prompt), 0.0)[0]
        self.rows.append(Row(self.source.name, group, maker, nbytes, fig["kl"], fig["top1"], greedy, ours))
        print(f"{self.source.name:28} {group:10} {maker:44} {nbytes:>10,} KL {fig['kl']:.4g} top-1 {fig['top1']:.1%}"
              f" greedy {greedy}", flush=True)


def files_bytes(*paths: Path) -> int:
    return sum(f.stat().st_size for p in paths for f in ([p] if p.is_file() else p.glob("*.safetensors")))


# GGUF -------------------------------------------------------------------------------------------------------------

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


def gguf_rows(bench: Bench, work: Path, mixes: list[str], folder: Path | None) -> None:
    source = bench.source
    quantize_bin, imatrix_bin = llama_tool(folder, "llama-quantize"), llama_tool(folder, "llama-imatrix")
    f16 = rwkv_convert.convert(source, "gguf", work / "f16.gguf", quant="f16")[0]
    imatrix = None
    if imatrix_bin is not None:
        imatrix = work / "imatrix.gguf"
        subprocess.run([str(imatrix_bin), "-m", str(f16), "-f", str(bundled_file(CALIBRATION_TEXT)), "-c", "512",
                        "-o", str(imatrix), "--no-ppl"], check=True, capture_output=True)

    def ours(mix: str, maker: str, name: str, **options) -> None:
        path = rwkv_convert.convert(source, "gguf", work / name, **options)[0]
        bench.add(mix, maker, path, path.stat().st_size, True)

    for mix in mixes:
        theirs = llama_quantize(f16, work / f"{mix}-llama.gguf", mix, quantize_bin, None)
        bench.add(mix, "llama-quantize", theirs, theirs.stat().st_size, False)
        if imatrix is not None:
            with_imatrix = llama_quantize(f16, work / f"{mix}-imatrix.gguf", mix, quantize_bin, imatrix)
            bench.add(mix, "llama-quantize --imatrix", with_imatrix, with_imatrix.stat().st_size, False)
        budget = str(theirs.stat().st_size)
        ours(mix, "rwkv-convert", f"{mix}.gguf", quant=mix)
        ours(mix, "rwkv-convert --calibration", f"{mix}-cal.gguf", quant=mix, calibration="bundled")
        ours(mix, "rwkv-convert --target-size (theirs)", f"{mix}-size.gguf", calibration="bundled",
             target_size=budget)
        ours(mix, "  the same, --small-matrices f32", f"{mix}-size-f32.gguf", calibration="bundled",
             target_size=budget, small_matrices="f32")


# MLX --------------------------------------------------------------------------------------------------------------

def mlx_rows(bench: Bench, work: Path, bits_list: list[int], max_bytes: int, group_size: int = 64) -> None:
    import mlx_lm

    from rwkv_convert.formats.mlx import supports

    source = bench.source
    if reason := supports(bench.ckpt.spec):
        raise RwkvConvertError(reason)
    rwkv_convert.convert(source, "hf", work / "hf")
    for bits in bits_list:
        group = f"mlx q{bits}"
        theirs = work / f"mlx-theirs-{bits}"
        mlx_lm.convert(str(work / "hf"), str(theirs), quantize=True, q_bits=bits, q_group_size=group_size,
                       trust_remote_code=True)
        bench.add(group, "mlx_lm.convert -q", theirs, files_bytes(theirs), False, max_bytes)
        options = {"quant": f"q{bits}", "group_size": group_size}
        for maker, extra in (("rwkv-convert", {}), ("rwkv-convert --calibration", {"calibration": "bundled"})):
            out = work / f"mlx-{bits}-{len(extra)}"
            rwkv_convert.convert(source, "mlx", out, **options, **extra)
            bench.add(group, maker, out, files_bytes(out), True, max_bytes)


# ONNX -------------------------------------------------------------------------------------------------------------

class _Windows:
    """onnxruntime's CalibrationDataReader over the bundled calibration text, as the sequence graph's inputs."""

    def __init__(self, ckpt, graph, windows: int = 8, length: int = 256):
        import onnx

        tokens = calibration_tokens(ckpt, BUNDLED, windows * length)
        model = onnx.load(str(graph), load_external_data=False)
        dims = {i.name: [d.dim_value or 1 for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
        self.items = [{"tokens": np.array([tokens[i:i + length]], np.int64),
                       "shift_in": np.zeros(dims["shift_in"], np.float32),
                       "wkv_in": np.zeros(dims["wkv_in"], np.float32)}
                      for i in range(0, len(tokens) - length + 1, length)]
        self.at = 0

    def get_next(self):
        self.at += 1
        return self.items[self.at - 1] if self.at <= len(self.items) else None

    def __iter__(self):
        return iter(self.items)


def onnxruntime_quantized(graph: Path, out: Path, config) -> Path:
    """Our float sequence graph quantized by onnxruntime's MatMulNBitsQuantizer (another tool's file: our checksum
    entry is dropped, the rwkv.* metadata the runner reads kept)."""
    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as mq

    class Quantizer(mq.MatMulNBitsQuantizer):
        def _generate_q4_node_config(self):
            # onnxruntime 1.32's GPTQ cannot pack a matrix of one block per column (the LoRA factors with 32
            # inputs: "cannot reshape"); those stay float in its file
            config = super()._generate_q4_node_config()
            for node in self.model.model.graph.node:
                weight = self.model.get_initializer(node.input[1]) if node.name in config else None
                if weight is not None and (weight.dims[0] // BLOCK) % 2:
                    config[node.name] = "fp32"
            return config

    model = onnx.load(str(graph))
    for entry in [p for p in model.metadata_props if p.key == "rwkv.checksums"]:
        model.metadata_props.remove(entry)
    quantizer = Quantizer(model, algo_config=config, block_size=BLOCK, is_symmetric=False, accuracy_level=4)
    quantizer.process()
    quantizer.model.save_model_to_file(str(out), use_external_data_format=True)
    return out


def onnx_rows(bench: Bench, work: Path) -> None:
    from onnxruntime.quantization import matmul_nbits_quantizer as mq

    source, group = bench.source, "onnx int4"
    float_graph = rwkv_convert.convert(source, "onnx", work / "float.onnx", graphs="sequence")[0]
    configs = {"onnxruntime RTN (MatMulNBitsQuantizer)": mq.DefaultWeightOnlyQuantConfig(block_size=BLOCK,
                                                                                          is_symmetric=False),
               "onnxruntime HQQ": mq.HQQWeightOnlyQuantConfig(block_size=BLOCK, bits=4),
               "onnxruntime GPTQ (calibration text)": mq.GPTQWeightOnlyQuantConfig(
                   calibration_data_reader=_Windows(bench.ckpt, float_graph))}
    for n, (maker, config) in enumerate(configs.items()):
        folder = work / f"ort-{n}"
        folder.mkdir()
        out = onnxruntime_quantized(float_graph, folder / "m.seq.onnx", config)
        bench.add(group, maker, out, sum(f.stat().st_size for f in folder.iterdir()), False)
    for maker, extra in (("rwkv-convert", {}), ("rwkv-convert --calibration", {"calibration": "bundled"})):
        folder = work / f"onnx-{len(extra)}"
        folder.mkdir()
        out = rwkv_convert.convert(source, "onnx", folder / "m.onnx", quant="int4", **extra)[0]
        bench.add(group, maker, out, sum(f.stat().st_size for f in folder.iterdir()), True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", help="default: bundled:v7 and bundled:v6")
    parser.add_argument("--formats", default="gguf,mlx,onnx")
    parser.add_argument("--mix", action="append", help="llama-quantize mixes (default q4_k_m, q3_k_m, q2_k)")
    parser.add_argument("--bits", type=int, action="append", help="MLX bits (default 4 and 3)")
    parser.add_argument("--llama-bin", default=os.environ.get("LLAMA_CPP_BIN"), help="llama-quantize, llama-imatrix")
    parser.add_argument("--max-bytes", type=int, default=None, help="score only this much of the held-out text")
    # mlx-lm's RWKV-7 on a CPU steps every token through Python (about 25 ms a token on the bundled model)
    parser.add_argument("--mlx-max-bytes", type=int, default=2048, help="the MLX rows' text (default 2048 bytes)")
    args = parser.parse_args()
    formats = args.formats.split(",")
    warnings.simplefilter("ignore")  # llama.cpp's files carry our keys: "rewritten by another tool" each time
    rows: list[Row] = []
    for name in args.model or ["bundled:v7", "bundled:v6"]:
        bench = Bench(model_path(name), args.max_bytes)
        sections = {"gguf": lambda w, bench=bench: gguf_rows(bench, w, args.mix or ["q4_k_m", "q3_k_m", "q2_k"],
                                                Path(args.llama_bin) if args.llama_bin else None),
                    "mlx": lambda w, bench=bench: mlx_rows(bench, w, args.bits or [4, 3], args.mlx_max_bytes),
                    "onnx": lambda w, bench=bench: onnx_rows(bench, w)}
        for fmt in formats:
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    sections[fmt](Path(tmp))
                except RwkvConvertError as e:  # a format this version cannot take
                    print(f"{bench.source.name}: no {fmt} rows: {e}")
        rows += bench.rows
        print_table(rows, args)  # after each model: what has been measured so far, should a later one stop


def print_table(rows: list[Row], args) -> None:
    print(f"\nEvery file run in its client; KL and top-1 on the bundled held-out text"
          f"{f' (first {args.max_bytes} bytes)' if args.max_bytes else ''}, the MLX rows on its first"
          f" {args.mlx_max_bytes} bytes; greedy: of {GREEDY} tokens")
    print(f"{'model':28} {'group':10} {'maker':44} {'bytes':>10} {'KL':>10} {'top-1':>7} {'greedy':>7}"
          "  KL / the other tools' best")
    for model in dict.fromkeys(r.model for r in rows):
        for group in dict.fromkeys(r.group for r in rows if r.model == model):
            same = [r for r in rows if r.model == model and r.group == group]
            theirs = min((r.kl for r in same if not r.ours), default=float("nan"))
            for r in same:
                print(f"{r.model:28} {r.group:10} {r.maker:44} {r.nbytes:>10,} {r.kl:>10.4g} {r.top1:>7.1%}"
                      f" {r.greedy:>7}  {r.kl / theirs:.3g}x")


if __name__ == "__main__":
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    main()
