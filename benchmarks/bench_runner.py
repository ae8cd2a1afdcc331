"""Decode ms/token and prefill tokens/s of the reference runner beside the `rwkv` pip package, same
checkpoint, same machine, same run.

    python benchmarks/bench_runner.py                 # v7 L12 C768 V65536 (0.19B), bf16 file, cpu fp32
    python benchmarks/bench_runner.py --version v6 --strategy "cpu bf16"

The checkpoint has random weights with real shapes (values do not change the speed)."""

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

HERE = Path(__file__).resolve()
REAL_RANKS = {"v6": {"maa": 32, "decay": 64}, "v7": {"w": 64, "a": 64, "v": 32, "g": 128}}


def make_checkpoint(version: str, n_layer: int, n_embd: int, vocab: int, dtype: str) -> Path:
    from rwkv_convert.fixtures import cache_dir, make_state_dict

    path = cache_dir() / f"bench-{version}-L{n_layer}-C{n_embd}-V{vocab}-{dtype}.pth"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        sd = make_state_dict(version, n_layer, n_embd, vocab, seed=0, ranks=REAL_RANKS.get(version))
        target = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
        tmp = path.with_suffix(".tmp")
        torch.save({k: v.to(target) for k, v in sd.items()}, tmp)
        os.replace(tmp, path)
    return path


def add_checkpoint_args(parser, version: str, versions: list[str], layers: int, embd: int, file_dtype: str) -> None:
    """The random checkpoint's shape options, shared by the benchmark scripts."""
    parser.add_argument("--version", default=version, choices=versions)
    parser.add_argument("--layers", type=int, default=layers)
    parser.add_argument("--embd", type=int, default=embd)
    parser.add_argument("--vocab", type=int, default=65536)
    parser.add_argument("--file-dtype", default=file_dtype, choices=["fp32", "bf16", "fp16"])


def ensure_checkpoint(version: str, n_layer: int, n_embd: int, vocab: int, dtype: str) -> Path:
    """make_checkpoint in a child process: building a large random model would otherwise leave the caller
    with several GB resident, which the rusage of every later child inherits at fork."""
    from rwkv_convert.fixtures import cache_dir

    path = cache_dir() / f"bench-{version}-L{n_layer}-C{n_embd}-V{vocab}-{dtype}.pth"
    if not path.exists():
        code = (f"import sys; sys.path.insert(0, {str(HERE.parent)!r}); from bench_runner import make_checkpoint;"
                f" make_checkpoint({version!r}, {n_layer}, {n_embd}, {vocab}, {dtype!r})")
        subprocess.run([sys.executable, "-c", code], check=True)
    return path


def spread(times: list[float]) -> float:
    """(90th - 10th percentile) / median: how much repeated runs disagree (0.1 = 10%)."""
    ordered = sorted(times)
    pick = lambda q: ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]  # noqa: E731
    return (pick(0.9) - pick(0.1)) / statistics.median(ordered)


def measure(forward, vocab: int, decode_tokens: int, prefill_len: int, repeats: int, state=None) -> dict:
    """forward(tokens, state) -> (logits, state). Medians and spreads over repeats (prefill) and tokens
    (decode). state: where decoding starts (default: the prompt's state)."""
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (prefill_len,), generator=gen).tolist()
    forward(prompt[:16], None)  # warm-up (JIT, allocator)
    prefill = []
    for _ in range(repeats):
        start = time.perf_counter()
        _, prompt_state = forward(prompt, None)
        prefill.append(time.perf_counter() - start)
    state = prompt_state if state is None else state
    decode = []
    token = 1
    for _ in range(decode_tokens):
        start = time.perf_counter()
        logits, state = forward([token], state)
        decode.append(time.perf_counter() - start)
        token = int(torch.argmax(logits))
    return {"decode_ms": statistics.median(decode) * 1000, "decode_spread": spread(decode),
            "prefill_tok_s": prefill_len / statistics.median(prefill), "prefill_spread": spread(prefill)}


def run_ours(path: Path, strategy: str, args) -> dict:
    import rwkv_convert

    start = time.perf_counter()
    model = rwkv_convert.load(path, strategy)
    load_s = time.perf_counter() - start
    result = measure(lambda t, s: model.forward(t, s), model.spec.vocab_size, args.decode_tokens,
                     args.prefill, args.repeats)
    return {**result, "load_s": load_s}


def run_pip(path: Path, strategy: str, args) -> dict:
    os.environ.setdefault("RWKV_JIT_ON", "1")
    os.environ.setdefault("RWKV_CUDA_ON", "0")
    from rwkv.model import RWKV

    start = time.perf_counter()
    if os.environ.get("RWKV_V7_ON") == "1":
        model = RWKV(str(path).removesuffix(".pth"), strategy=strategy)
    else:
        model = RWKV(str(path), strategy=strategy, verbose=False)
    load_s = time.perf_counter() - start
    vocab = model.w["emb.weight"].shape[0] if hasattr(model, "w") else model.z["emb.weight"].shape[0]
    result = measure(lambda t, s: model.forward(t, s), vocab, args.decode_tokens, args.prefill, args.repeats)
    return {**result, "load_s": load_s}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_args(p, "v7", ["v4", "v5.2", "v6", "v7"], 12, 768, "bf16")
    p.add_argument("--strategy", default="cpu fp32")
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--prefill", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--only", choices=["ours", "pip"], help=argparse.SUPPRESS)  # used for the subprocesses
    args = p.parse_args()
    path = make_checkpoint(args.version, args.layers, args.embd, args.vocab, args.file_dtype)

    if args.only:
        result = (run_ours if args.only == "ours" else run_pip)(path, args.strategy, args)
        print("RESULT " + json.dumps(result))
        return

    rows = {}
    for who in ("pip", "ours"):  # each in a fresh process: the pip package changes global torch settings
        env = {k: v for k, v in os.environ.items() if not k.startswith("RWKV_V7")}
        if who == "pip" and args.version == "v7":
            env["RWKV_V7_ON"] = "1"
        cmd = [sys.executable, str(HERE), *sys.argv[1:], "--only", who]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            sys.exit(f"{who} failed:\n{proc.stderr[-2000:]}")
        rows[who] = json.loads(line[len("RESULT "):])

    print(f"\n{args.version} L{args.layers} C{args.embd} V{args.vocab} ({args.file_dtype} file), "
          f"strategy '{args.strategy}', torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'runner':<14}{'decode ms/token':>17}{'prefill tok/s':>15}{'load s':>9}")
    for who, name in (("ours", "rwkv-convert"), ("pip", "rwkv 0.8.32")):
        r = rows[who]
        print(f"{name:<14}{r['decode_ms']:>17.1f}{r['prefill_tok_s']:>15.0f}{r['load_s']:>9.2f}")
    ours, pip = rows["ours"], rows["pip"]
    print(f"{'ours / pip':<14}{ours['decode_ms'] / pip['decode_ms']:>16.2f}x"
          f"{ours['prefill_tok_s'] / pip['prefill_tok_s']:>14.2f}x")


if __name__ == "__main__":
    main()
