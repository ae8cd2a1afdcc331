"""Load time of a prepared safetensors file beside preparing the same model from its .pth (what
`rwkv_convert.load(pth, strategy)` and the pip package do on every start), each in a fresh process.

    python benchmarks/bench_prepared.py                       # v6 L24 C1024 V65536 (0.47B), fp16 file
    python benchmarks/bench_prepared.py --strategy "cpu fp32"

"ready" = load + the first one-token forward (a mapped file pays its page reads there)."""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_runner import add_checkpoint_args, ensure_checkpoint  # noqa: E402

HERE = Path(__file__).resolve()


def child(path: str, strategy: str | None) -> dict:
    import rwkv_convert

    start = time.perf_counter()
    model = rwkv_convert.load(path, strategy)
    loaded = time.perf_counter() - start
    model.forward([1])
    ready = time.perf_counter() - start
    return {"load_s": loaded, "ready_s": ready,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2}


def run(*args: str) -> dict:
    proc = subprocess.run([sys.executable, str(HERE), "--child", *args], capture_output=True, text=True)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        sys.exit(f"child failed:\n{proc.stderr[-2000:]}")
    return json.loads(line[len("RESULT "):])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_args(p, "v6", ["v4", "v5.2", "v6", "v7"], 24, 1024, "fp16")
    p.add_argument("--strategy", default="cpu fp32i8")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        path, strategy = args.child
        print("RESULT " + json.dumps(child(path, None if strategy == "-" else strategy)))
        return
    src = ensure_checkpoint(args.version, args.layers, args.embd, args.vocab, args.file_dtype)
    import rwkv_convert  # in the parent only: the children time their own import-free load

    with tempfile.TemporaryDirectory(dir=src.parent) as tmp:
        start = time.perf_counter()
        (prepared,) = rwkv_convert.convert(src, "safetensors", Path(tmp) / "prepared.safetensors",
                                           layout="prepared", strategy=args.strategy)
        write_s = time.perf_counter() - start
        rows = {"from .pth": run(str(src), args.strategy), "prepared": run(str(prepared), "-")}
        size = prepared.stat().st_size
    print(f"\n{args.version} L{args.layers} C{args.embd} V{args.vocab} ({args.file_dtype} file), strategy"
          f" '{args.strategy}'; prepared file {size / 1e9:.2f} GB, written in {write_s:.1f} s")
    print(f"{'source':<12}{'load s':>9}{'ready s':>9}{'peak RSS GB':>13}")
    for name, r in rows.items():
        print(f"{name:<12}{r['load_s']:>9.2f}{r['ready_s']:>9.2f}{r['peak_rss_gb']:>13.2f}")
    print(f"prepared / from .pth: {rows['prepared']['ready_s'] / rows['from .pth']['ready_s']:.2f}x the time")


if __name__ == "__main__":
    main()
