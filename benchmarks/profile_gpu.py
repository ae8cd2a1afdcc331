"""Where our GPU runner's time goes: one-token decode (whole forward() with the CUDA graph, the graph replay
alone, and the kernels of the un-graphed step) and a prefill, with torch.profiler's top kernels. For tuning the
CUDA path (issue: CUDA kernels that prove themselves); run on a lent GPU machine, never in CI.

    python benchmarks/profile_gpu.py                         # v7 L24 C2048 V65536 (1.5B), bf16 file, cuda fp16
    python benchmarks/profile_gpu.py --strategy "cuda fp16i8" --prefill 256
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_runner import add_checkpoint_args, ensure_checkpoint  # noqa: E402


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def top_kernels(fn, rows: int, title: str) -> None:
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.self_device_time_total > 0]
    events.sort(key=lambda e: e.self_device_time_total, reverse=True)
    total = sum(e.self_device_time_total for e in events)
    launches = sum(e.count for e in events)
    print(f"\n{title}: {total / 1000:.2f} ms of GPU time in {launches} kernel/copy launches")
    for e in events[:rows]:
        print(f"  {e.self_device_time_total / 1000:8.3f} ms {e.count:6d}x  {e.key[:90]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_args(p, "v7", ["v4", "v5.2", "v6", "v7"], 24, 2048, "bf16")
    p.add_argument("--strategy", default="cuda fp16")
    p.add_argument("--prefill", type=int, default=1024)
    p.add_argument("--rows", type=int, default=14)
    args = p.parse_args()
    import rwkv_convert

    path = ensure_checkpoint(args.version, args.layers, args.embd, args.vocab, args.file_dtype)
    model = rwkv_convert.load(path, args.strategy)
    prompt = torch.randint(0, args.vocab, (args.prefill,), generator=torch.Generator().manual_seed(0)).tolist()
    _, state = model.forward(prompt[:16], None)
    model.forward([1], state)  # captures the graph

    whole = median_ms(lambda: model.forward([1], state), 50)
    graph = model._graph[0] if model._graph else None
    replay = median_ms(graph.replay, 50) if graph else float("nan")
    model._graph_capable = False
    eager = median_ms(lambda: model.forward([1], state), 20)
    prefill = median_ms(lambda: model.forward(prompt, None), 3)
    card = torch.cuda.get_device_name()
    print(f"{args.version} L{args.layers} C{args.embd} V{args.vocab} {args.strategy!r} on {card}")
    print(f"decode forward() with graph {whole:.3f} ms; graph replay alone {replay:.3f} ms; eager step {eager:.3f} ms")
    print(f"prefill {args.prefill}: {prefill:.2f} ms = {args.prefill / prefill * 1000:.0f} tok/s")
    top_kernels(lambda: model.forward([1], state), args.rows, "one eager decode step")
    top_kernels(lambda: model.forward(prompt, None), args.rows, f"one {args.prefill}-token prefill")


if __name__ == "__main__":
    main()
