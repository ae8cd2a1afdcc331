"""RWKV-7 variants on the CPU: DeepEmbed ("7a") decode beside the rwkv pip package (RWKV_DE_VERSION=1) in the
same run, and DEA ("7b"): state size and decode time per token as the context grows.

    python benchmarks/bench_variants.py                       # L4 C256 V16384, contexts up to 4096
    python benchmarks/bench_variants.py --layers 12 --embd 768 --vocab 65536 --contexts 512,4096
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import rwkv_convert
from rwkv_convert.fixtures import make_state_dict
from rwkv_convert.runner import Model

PIP_DECODE = """
import os, sys, time, statistics, torch
from rwkv.model import RWKV
model = RWKV(sys.argv[1].removesuffix(".pth"), strategy="cpu fp32")
logits, state = model.forward(list(range(1, 65)), None)
times = []
for t in range(int(sys.argv[2])):
    start = time.perf_counter()
    logits, state = model.forward([t + 1], state)
    times.append(time.perf_counter() - start)
print(statistics.median(times) * 1e3)
"""


def decode_ms(model, state, steps: int) -> tuple[float, list]:
    times = []
    for t in range(steps):
        start = time.perf_counter()
        _, state = model.forward([t + 1], state)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3, state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--embd", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=16384)
    parser.add_argument("--contexts", default="256,1024,2048,4096")
    parser.add_argument("--steps", type=int, default=16, help="decode steps timed (the median is shown)")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for variant in ("v7", "v7-deepembed", "v7-dea"):
            sd = make_state_dict(variant, args.layers, args.embd, args.vocab)
            files[variant] = Path(tmp) / f"{variant}.pth"
            torch.save({k: v.to(torch.bfloat16) for k, v in sd.items()}, files[variant])

        print(f"L{args.layers} C{args.embd} V{args.vocab}, bf16 files, cpu fp32, decode after 64 tokens"
              f" (median of {args.steps})\n")
        print(f"{'model':<26}{'runtime':<24}{'decode ms/token':>16}")
        for variant in ("v7", "v7-deepembed"):
            model = rwkv_convert.load(files[variant])
            _, state = model.forward(list(range(1, 65)))
            ms, _ = decode_ms(model, state, args.steps)
            print(f"{variant:<26}{'rwkv-convert':<24}{ms:>16.2f}")
            env = {k: v for k, v in os.environ.items() if not k.startswith("RWKV_")}
            env.update(RWKV_V7_ON="1", RWKV_JIT_ON="1", RWKV_CUDA_ON="0")
            if variant == "v7-deepembed":
                env["RWKV_DE_VERSION"] = "1"
            proc = subprocess.run([sys.executable, "-c", PIP_DECODE, str(files[variant]), str(args.steps)],
                                  env=env, capture_output=True, text=True)
            shown = f"{float(proc.stdout.split()[-1]):>16.2f}" if proc.returncode == 0 else \
                f"{'failed: ' + (proc.stderr.strip().splitlines() or ['?'])[-1][:40]:>16}"
            print(f"{variant:<26}{'rwkv 0.8.32 (pip)':<24}{shown}")

        print("\nDEA (7b): the state grows with the context; decode rebuilds keys and values of every position")
        print(f"{'context':>8}{'state bytes':>14}{'bytes/token':>13}{'decode ms/token':>17}")
        model = rwkv_convert.load(files["v7-dea"])
        state, done, previous = None, 0, None
        for context in (int(c) for c in args.contexts.split(",")):
            ids = torch.randint(0, args.vocab, (context - done,), generator=torch.Generator().manual_seed(context))
            _, state = model.forward(ids.tolist(), state)
            done = context
            size = Model.state_bytes(state)
            per_token = "-" if previous is None else f"{(size - previous[1]) / (context - previous[0]):.0f}"
            ms, _ = decode_ms(model, state, args.steps)  # from a copy: the timed steps do not grow `state`
            print(f"{context:>8}{size:>14,}{per_token:>13}{ms:>17.2f}")
            previous = (context, size)


if __name__ == "__main__":
    main()
