"""The reference runner on the CPU beside the runtimes it verifies, same checkpoint, same machine, same run:
the pip package, llama.cpp (on our GGUF) and onnxruntime (on our ONNX). Each row runs in a fresh process.

    python benchmarks/bench_cpu.py                    # v7 L12 C768 V65536 (0.19B), bf16 file
    python benchmarks/bench_cpu.py --version v6
    python benchmarks/bench_cpu.py --rows ours:cpu_fp32,pip:cpu_fp32

Decode is the median over --decode-tokens steps, prefill over --repeats runs of --prefill tokens; "spread"
is (p90 - p10) / median. The machine's floors are measured before and after the rows: read bandwidth (a
multi-threaded sum over 512 MB, more than the model's weights) and matmul FLOP/s (a 1024x4096x4096 fp32 and
bf16 GEMM). GB/s is the bytes of the matrices one token reads divided by the decode time; GFLOP/s is
2 x matrix parameters x prompt tokens / prefill time. A row is flagged DISTURBED when other load took the
CPU (steal time above 5%) or its decode spread is above 25%: these machines are shared. Two extra rows:
"denormal" decodes from a state scaled to subnormal values (a slowdown from denormals would show there),
and "overhead" runs the same layer count at width 64, whose time is the per-token cost (Python, dispatch)
that does not grow with the model's width."""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from rwkv_convert.arch.common import PROJECTIONS_KEY

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_runner import add_checkpoint_args, ensure_checkpoint, measure, run_pip  # noqa: E402

HERE = Path(__file__).resolve()
DEFAULT_ROWS = ("ours:cpu_fp32,ours:cpu_bf16,ours:cpu_fp32i8,denormal:cpu_fp32,overhead:cpu_fp32,pip:cpu_fp32,"
                "pip:cpu_bf16,llama:f16,llama:q8_0,onnx:fp32")
# bytes read per matrix parameter by the other runtimes' settings (q8_0: 34 bytes per 32 values); our rows
# report the bytes their weights hold
BYTES_PER_PARAM = {"cpu fp32": 4, "cpu bf16": 2, "f16": 2, "q8_0": 34 / 32, "fp32": 4}
STEAL_LIMIT, SPREAD_LIMIT = 0.05, 0.25


def cpu_times() -> tuple[int, int]:
    """(steal, total) jiffies since boot, from /proc/stat ((0, 0) where there is none)."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    return (fields[7] if len(fields) > 7 else 0), sum(fields[:8])


def floors() -> dict:
    """This machine's read bandwidth (GB/s) and fp32/bf16 matmul GFLOP/s, with torch's threads."""
    buffer = torch.ones(512 * 1024 * 1024 // 4)
    reads = []
    for _ in range(7):
        start = time.perf_counter()
        buffer.sum()
        reads.append(time.perf_counter() - start)
    result = {"read_gb_s": buffer.numel() * 4 / sorted(reads)[3] / 1e9}
    del buffer
    for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        a, b = torch.randn(1024, 4096, dtype=dtype), torch.randn(4096, 4096, dtype=dtype)
        a @ b
        times = []
        for _ in range(5):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
        result[f"{name}_gflop_s"] = 2 * 1024 * 4096 * 4096 / sorted(times)[2] / 1e9
    return result


def matrix_params(ckpt) -> int:
    """Parameters of the large matrices one token reads (the embedding is one row: not counted)."""
    from rwkv_convert import arch

    matrices = arch.module_for(ckpt.spec.version).MATRICES
    return sum(math.prod(shape) for key, shape in ckpt.shapes.items()
               if key == "head.weight" or key.split(".", 2)[-1] in matrices)


def run_ours(path: Path, strategy: str, args, denormal: bool = False) -> dict:
    import rwkv_convert

    model = rwkv_convert.load(path, strategy)
    state = None
    if denormal:  # a state driven to subnormal values: every float state tensor scaled by 1e-39
        _, state = model.forward(list(range(16)), None)
        state = [t * 1e-39 if t.is_floating_point() else t for t in state]
    result = measure(lambda t, s: model.forward(t, s), model.spec.vocab_size, args.decode_tokens, args.prefill,
                     args.repeats, state=state)
    held = [w for lw in model.layers for k, w in lw.items() if k in model.module.MATRICES or k == PROJECTIONS_KEY]
    return {**result, "weight_bytes": sum(w.nbytes for w in held) + model.head.nbytes}


def run_llama(path: Path, quant: str, args) -> dict:
    import rwkv_convert
    from rwkv_convert.runtimes.llama_cpp import LlamaCppSession

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        out = Path(tmp) / f"m-{quant}.gguf"
        rwkv_convert.convert(path, "gguf", out, quant=quant)
        llm = LlamaCppSession(out, n_ctx=args.prefill + args.decode_tokens + 64, logits_all=False).llm

        def forward(tokens, state):
            if state is None:
                llm.reset()
            llm.eval(tokens)
            return torch.from_numpy(np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)), True

        return measure(forward, llm.n_vocab(), args.decode_tokens, args.prefill, args.repeats)


def run_onnx(path: Path, args) -> dict:
    import rwkv_convert
    from rwkv_convert.runtimes.onnx_runtime import OnnxModel

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        paths = rwkv_convert.convert(path, "onnx", Path(tmp) / "m.onnx", logits="last")
        model = OnnxModel(paths[0], providers=["CPUExecutionProvider"])

        def forward(tokens, state):
            logits, state = model.forward_batch([tokens], state)
            return torch.from_numpy(np.ascontiguousarray(logits[0])), state

        return measure(forward, model.spec.vocab_size, args.decode_tokens, args.prefill, args.repeats)


def run_row(who: str, setting: str, args) -> dict:
    if who == "overhead":  # same layer count, width 64: what a token costs besides reading the weights
        small = ensure_checkpoint(args.version, args.layers, 64, 256, args.file_dtype)
        return run_ours(small, setting, args)
    path = ensure_checkpoint(args.version, args.layers, args.embd, args.vocab, args.file_dtype)
    if who in ("ours", "denormal"):
        return run_ours(path, setting, args, denormal=who == "denormal")
    if who == "pip":
        return run_pip(path, setting, args)
    if who == "llama":
        return run_llama(path, setting, args)
    return run_onnx(path, args)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_args(p, "v7", ["v5.2", "v6", "v7"], 12, 768, "bf16")
    p.add_argument("--rows", default=DEFAULT_ROWS, help="WHO:SETTING,... (WHO: ours, denormal, overhead, pip,"
                   " llama, onnx; spaces in a strategy written as _)")
    p.add_argument("--decode-tokens", type=int, default=48)
    p.add_argument("--prefill", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--workdir", default=None, help="where the exports are written (a temp dir inside it)")
    p.add_argument("--only", nargs=2, metavar=("WHO", "SETTING"), help=argparse.SUPPRESS)  # the subprocesses
    args = p.parse_args()

    if args.only:
        print("RESULT " + json.dumps(run_row(args.only[0], args.only[1], args)))
        return

    from rwkv_convert.formats.registry import read_checkpoint

    path = ensure_checkpoint(args.version, args.layers, args.embd, args.vocab, args.file_dtype)
    params = matrix_params(read_checkpoint(path))
    before = floors()
    rows = {}
    for row in args.rows.split(","):
        who, setting = row.split(":", 1)
        if who in ("ours", "denormal", "overhead", "pip"):
            setting = setting.replace("_", " ")  # a strategy
        env = {k: v for k, v in os.environ.items() if not k.startswith("RWKV_V7")}
        if who == "pip" and args.version == "v7":
            env["RWKV_V7_ON"] = "1"
        steal0, total0 = cpu_times()
        proc = subprocess.run([sys.executable, str(HERE), *sys.argv[1:], "--only", who, setting], env=env,
                              capture_output=True, text=True)
        steal1, total1 = cpu_times()
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            rows[row] = {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:100]}
            continue
        rows[row] = {**json.loads(line[len("RESULT "):]), "setting": setting, "who": who,
                     "steal": (steal1 - steal0) / max(1, total1 - total0)}
    after = floors()

    print(f"\n{args.version} L{args.layers} C{args.embd} V{args.vocab} ({args.file_dtype} file,"
          f" {params / 1e6:.0f}M matrix parameters), {args.prefill}-token prefill x{args.repeats},"
          f" {args.decode_tokens} decode steps;"
          f" {os.cpu_count()} CPUs, torch {torch.__version__} with {torch.get_num_threads()} threads")
    for name, f in (("before", before), ("after", after)):
        print(f"floors {name:<7} read {f['read_gb_s']:.1f} GB/s, matmul fp32 {f['fp32_gflop_s']:.0f} GFLOP/s,"
              f" bf16 {f['bf16_gflop_s']:.0f} GFLOP/s")
    drift = abs(after["read_gb_s"] - before["read_gb_s"]) / before["read_gb_s"]
    if drift > 0.15:
        print(f"DISTURBED: the read bandwidth moved {drift:.0%} between the start and the end of the run")
    print(f"\n{'row':<22}{'decode ms':>10}{'spread':>8}{'GB/s':>7}{'prefill tok/s':>14}{'spread':>8}{'GFLOP/s':>9}"
          f"{'steal':>7}")
    for row, r in rows.items():
        if "error" in r:
            print(f"{row:<22}  failed: {r['error']}")
            continue
        gb_s = ""
        read = r.get("weight_bytes") or params * BYTES_PER_PARAM.get(r["setting"], 0)
        if r["who"] != "overhead" and read:
            gb_s = f"{read / (r['decode_ms'] / 1000) / 1e9:.1f}"
        gflop = "" if r["who"] == "overhead" else f"{2 * params * r['prefill_tok_s'] / 1e9:.0f}"
        flag = "  DISTURBED" if r["steal"] > STEAL_LIMIT or r["decode_spread"] > SPREAD_LIMIT else ""
        print(f"{row:<22}{r['decode_ms']:>10.2f}{r['decode_spread']:>8.0%}{gb_s:>7}{r['prefill_tok_s']:>14.0f}"
              f"{r['prefill_spread']:>8.0%}{gflop:>9}{r['steal']:>7.0%}{flag}")

    def ratio(a: str, b: str, key: str, target: str) -> None:
        if "decode_ms" in rows.get(a, {}) and "decode_ms" in rows.get(b, {}):
            print(f"{a} / {b} {key}: {rows[a][key] / rows[b][key]:.2f}x (target {target})")

    print()
    ratio("ours:cpu_fp32", "pip:cpu_fp32", "decode_ms", "<= 0.8x")
    ratio("ours:cpu_bf16", "pip:cpu_bf16", "decode_ms", "<= 0.6x")
    ratio("ours:cpu_fp32i8", "llama:q8_0", "decode_ms", "<= 1.2x")
    pip_rows = [r for r in rows if r.startswith("pip:") and "prefill_tok_s" in rows[r]]
    if pip_rows:
        best = max(pip_rows, key=lambda r: rows[r]["prefill_tok_s"])
        ratio("ours:cpu_bf16", best, "prefill_tok_s", ">= 2x the package's best")
    ratio("ours:cpu_bf16", "llama:f16", "prefill_tok_s", ">= 1x")
    ratio("ours:cpu_fp32", "llama:f16", "prefill_tok_s", ">= 1x")
    ratio("denormal:cpu_fp32", "ours:cpu_fp32", "decode_ms", "~1x: denormals cost nothing")
    if "decode_ms" in rows.get("overhead:cpu_fp32", {}) and "decode_ms" in rows.get("ours:cpu_fp32", {}):
        share = rows["overhead:cpu_fp32"]["decode_ms"] / rows["ours:cpu_fp32"]["decode_ms"]
        print(f"per-token cost that does not grow with width (Python, dispatch, L{args.layers} at C64): "
              f"{rows['overhead:cpu_fp32']['decode_ms']:.2f} ms, {share:.0%} of cpu fp32 decode")


if __name__ == "__main__":
    main()
