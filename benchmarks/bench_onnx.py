"""onnxruntime (CPU) decode ms/token and prefill tokens/s of our ONNX exports beside the `rwkv` pip package
at `cpu fp32` and `cpu fp32i8`, same checkpoint, same machine, same run (each runner in its own process).

    python benchmarks/bench_onnx.py                    # v7 L12 C768 V65536, bf16 file
    python benchmarks/bench_onnx.py --version v6

The exports use --logits last for the sequence graph, like the package's forward (last logits only)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_runner import add_checkpoint_args, ensure_checkpoint, measure, run_pip  # noqa: E402

HERE = Path(__file__).resolve()
ROWS = [("pip", "cpu fp32", "rwkv 0.8.32 cpu fp32"), ("pip", "cpu fp32i8", "rwkv 0.8.32 cpu fp32i8"),
        ("onnx", "none", "onnx fp32"), ("onnx", "int8", "onnx int8"), ("onnx", "int8/fp32", "onnx int8, fp32 compute"),
        ("onnx", "int4", "onnx int4"), ("onnx", "int4/fp32", "onnx int4, fp32 compute")]


def run_onnx(path: Path, setting: str, args) -> dict:
    """setting: --onnx-quant, then /COMPUTE for --onnx-compute (default int8: accuracy_level 4)."""
    import rwkv_convert
    from rwkv_convert.runtimes.onnx_runtime import OnnxModel

    quant, _, compute = setting.partition("/")
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        start = time.perf_counter()
        paths = rwkv_convert.convert(path, "onnx", Path(tmp) / "m.onnx", quant=quant, logits="last",
                                     compute=compute or "int8")
        export_s = time.perf_counter() - start
        start = time.perf_counter()
        model = OnnxModel(paths[0], providers=["CPUExecutionProvider"])
        load_s = time.perf_counter() - start

        def forward(tokens, state):
            logits, state = model.forward_batch([tokens], state)
            return torch.from_numpy(np.ascontiguousarray(logits[0])), state

        result = measure(forward, model.spec.vocab_size, args.decode_tokens, args.prefill, args.repeats)
        size = sum(p.stat().st_size for p in paths)
    return {**result, "load_s": load_s, "export_s": export_s, "bytes": size}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_args(p, "v7", ["v4", "v5.2", "v6", "v7"], 12, 768, "bf16")
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--prefill", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workdir", default=None, help="where the exports are written (a temp dir inside it)")
    p.add_argument("--only", nargs=2, metavar=("WHO", "SETTING"), help=argparse.SUPPRESS)  # the subprocesses
    args = p.parse_args()
    path = ensure_checkpoint(args.version, args.layers, args.embd, args.vocab, args.file_dtype)

    if args.only:
        who, setting = args.only
        result = run_pip(path, setting, args) if who == "pip" else run_onnx(path, setting, args)
        print("RESULT " + json.dumps(result))
        return

    rows = {}
    for who, setting, name in ROWS:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RWKV_V7")}
        if who == "pip" and args.version == "v7":
            env["RWKV_V7_ON"] = "1"
        proc = subprocess.run([sys.executable, str(HERE), *sys.argv[1:], "--only", who, setting], env=env,
                              capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            rows[name] = {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:100]}
            continue
        rows[name] = json.loads(line[len("RESULT "):])

    print(f"\n{args.version} L{args.layers} C{args.embd} V{args.vocab} ({args.file_dtype} file), {args.prefill}-token"
          f" prefill, {args.decode_tokens} decode steps, medians; {os.cpu_count()} CPUs")
    print(f"{'runner':<26}{'decode ms/token':>17}{'prefill tok/s':>15}{'load s':>9}{'export s':>10}{'MB':>8}")
    for name, r in rows.items():
        if "error" in r:
            print(f"{name:<26}  failed: {r['error']}")
            continue
        export = f"{r['export_s']:>10.1f}" if "export_s" in r else f"{'':>10}"
        size = f"{r['bytes'] / 1e6:>8.0f}" if "bytes" in r else f"{'':>8}"
        print(f"{name:<26}{r['decode_ms']:>17.1f}{r['prefill_tok_s']:>15.0f}{r['load_s']:>9.2f}{export}{size}")


if __name__ == "__main__":
    main()
