"""GPU decode ms/token and prefill tokens/s of our runner (CUDA kernels, CUDA-graph decode) beside the `rwkv`
pip package with its own CUDA kernels (RWKV_CUDA_ON=1), same checkpoint, same card, same run; each runner and
strategy in its own process. Also the decode floor: weight bytes read per token / measured copy bandwidth.

    python benchmarks/bench_gpu.py                      # v7 L24 C2048 V65536 (1.5B), bf16 file
    python benchmarks/bench_gpu.py --version v6 --strategies "cuda fp16" "cuda fp16i8"

Run by scripts/gpu-check.sh on a lent GPU machine; never run in CI."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_runner import add_checkpoint_args, ensure_checkpoint  # noqa: E402

HERE = Path(__file__).resolve()


def copy_bandwidth_gbs() -> float:
    """Device-to-device copy, bytes read + written per second."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        dst.copy_(src)
    torch.cuda.synchronize()
    return 2 * src.numel() * 10 / (time.perf_counter() - start) / 1e9


def timed(forward, vocab: int, args) -> dict:
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (args.prefill,), generator=gen).tolist()

    def call(tokens, state):
        out = forward(tokens, state)
        torch.cuda.synchronize()
        return out

    for _ in range(2):  # warm-up: kernel builds, graph capture, allocator
        call(prompt[:64], None)
        _, state = call(prompt[:1], None)
        call([1], state)
    prefill = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        _, state = call(prompt, None)
        prefill.append(time.perf_counter() - start)
    decode, token = [], 1
    for _ in range(args.decode_tokens):
        start = time.perf_counter()
        logits, state = call([token], state)
        decode.append(time.perf_counter() - start)
        token = int(torch.argmax(logits))
    return {"decode_ms": statistics.median(decode) * 1000, "prefill_tok_s": args.prefill / statistics.median(prefill),
            "gpu_gb": torch.cuda.max_memory_allocated() / 1e9}


def child(who: str, strategy: str, path: Path, args) -> dict:
    if who == "ours":
        import rwkv_convert

        model = rwkv_convert.load(path, strategy)
        weight_bytes = sum(getattr(w, "nbytes", 0) for lw in model.layers for w in lw.values()) + model.head.nbytes
        return {**timed(model.forward, model.spec.vocab_size, args), "weight_bytes": weight_bytes}
    os.environ["RWKV_CUDA_ON"] = "1"
    os.environ.setdefault("RWKV_JIT_ON", "1")
    if args.version == "v7":  # read when rwkv.model is imported: it rebinds RWKV to the v7 class
        os.environ["RWKV_V7_ON"] = "1"
    from rwkv.model import RWKV

    if args.version == "v7":
        model = RWKV(str(path).removesuffix(".pth"), strategy=strategy)
    else:
        model = RWKV(str(path), strategy=strategy, verbose=False)
    return timed(lambda t, s: model.forward(t, s), args.vocab, args)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_args(p, "v7", ["v4", "v5.2", "v6", "v7"], 24, 2048, "bf16")
    p.add_argument("--strategies", nargs="+", default=["cuda fp16", "cuda bf16", "cuda fp16i8"])
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--prefill", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--only", nargs=2, metavar=("WHO", "STRATEGY"), help=argparse.SUPPRESS)
    args = p.parse_args()
    path = ensure_checkpoint(args.version, args.layers, args.embd, args.vocab, args.file_dtype)
    if args.only:
        print("RESULT " + json.dumps(child(args.only[0], args.only[1], path, args)))
        return

    bandwidth = copy_bandwidth_gbs()
    rows = []
    for strategy in args.strategies:
        for who in ("pip", "ours"):
            env = {k: v for k, v in os.environ.items() if not k.startswith("RWKV_V7")}
            proc = subprocess.run([sys.executable, str(HERE), *sys.argv[1:], "--only", who, strategy], env=env,
                                  capture_output=True, text=True)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if proc.returncode or line is None:
                err = (proc.stderr.strip().splitlines() or ["no output"])[-1][:90]
                rows.append((strategy, who, {"error": err}))
            else:
                rows.append((strategy, who, json.loads(line[len("RESULT "):])))
    print(f"\n{torch.cuda.get_device_name()}, copy bandwidth {bandwidth / 1000:.2f} TB/s; {args.version} L{args.layers}"
          f" C{args.embd} V{args.vocab}; prefill {args.prefill} tokens; medians")
    print(f"{'strategy':<14}{'runner':<8}{'decode ms':>11}{'prefill tok/s':>15}{'GPU GB':>8}{'floor ms':>10}")
    for strategy, who, r in rows:
        if "error" in r:
            print(f"{strategy:<14}{who:<8}  failed: {r['error']}")
            continue
        floor = f"{r['weight_bytes'] / (bandwidth * 1e9) * 1000:>10.2f}" if "weight_bytes" in r else f"{'':>10}"
        print(f"{strategy:<14}{who:<8}{r['decode_ms']:>11.2f}{r['prefill_tok_s']:>15.0f}{r['gpu_gb']:>8.2f}{floor}")


if __name__ == "__main__":
    main()
