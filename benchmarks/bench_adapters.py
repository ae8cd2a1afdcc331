"""Merging a fine-tuning adapter while converting: peak RSS and wall time of `convert --lora` beside the plain
convert of the same base, and beside what users do today (RWKV-PEFT's merge script: base and adapter loaded
whole, merged, torch.save'd; then the merged .pth converted). Each in a fresh process, same run.

    python benchmarks/bench_adapters.py       # v7 L12 C1024 V65536 bf16 base, LoRA rank 64 on every matrix

The bound the issue sets: peak with the adapter <= plain peak + 2 x the adapter file."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_convert import measure  # noqa: E402  (a child process's wall time and peak RSS)
from bench_runner import add_checkpoint_args, ensure_checkpoint  # noqa: E402

OURS = """
import sys
import rwkv_convert
from rwkv_convert.adapters import AdapterRef
adapters = [AdapterRef(sys.argv[3], alpha=32.0)] if sys.argv[3] != "-" else []
rwkv_convert.convert(sys.argv[1], sys.argv[2], sys.argv[4], adapters=adapters)
"""
# RWKV-PEFT's merge/merge.py (type lora, on the CPU), as it works: both files loaded whole, merged, saved
PEFT_MERGE = """
import sys, torch
from collections import OrderedDict
w = torch.load(sys.argv[1], map_location="cpu")
w_lora = torch.load(sys.argv[2], map_location="cpu")
for k in w_lora: w[k] = w_lora[k]
out = OrderedDict()
keys = list(w.keys())
for k in keys:
    if k.endswith(".weight"):
        p = k[:-len(".weight")]
        if p + ".lora_A" in keys:
            a, b = w[p + ".lora_A"], w[p + ".lora_B"]
            w[k] += b @ a * (32 / b.shape[1])
            out[k] = w[k].to(device="cpu", copy=True)
            del w[k], w[p + ".lora_A"], w[p + ".lora_B"]
            continue
    if "lora" not in k:
        out[k] = w[k].clone(); del w[k]
torch.save(out, sys.argv[3])
"""


def make_lora(base: Path, rank: int, out: Path) -> Path:
    """A LoRA of `rank` on every block matrix of `base`, bf16 as RWKV-PEFT saves it (and a trained ln weight)."""
    if out.exists():
        return out
    sd = torch.load(base, map_location="cpu", weights_only=True, mmap=True)
    g = torch.Generator().manual_seed(0)
    adapter = {}
    for name, t in sd.items():
        if name.startswith("blocks.") and name.endswith(".weight") and t.dim() == 2 and min(t.shape) > 256:
            prefix = name.removesuffix(".weight")
            adapter[f"{prefix}.lora_A"] = (torch.randn(rank, t.shape[1], generator=g) * 0.01).bfloat16()
            adapter[f"{prefix}.lora_B"] = (torch.randn(t.shape[0], rank, generator=g) * 0.01).bfloat16()
    adapter["blocks.0.ln1.weight"] = sd["blocks.0.ln1.weight"].clone()
    torch.save(adapter, out)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_args(p, "v7", ["v6", "v7"], 12, 1024, "bf16")
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--to", default="gguf", choices=["gguf", "pth"])
    args = p.parse_args()
    src = ensure_checkpoint(args.version, args.layers, args.embd, args.vocab, args.file_dtype)
    lora = make_lora(src, args.rank, src.with_name(f"{src.stem}-lora{args.rank}.pth"))
    suffix = ".gguf" if args.to == "gguf" else ".pth"
    out, merged = src.with_name(f"bench-adapter-out{suffix}"), src.with_name("bench-peft-merged.pth")
    rows = {}
    rows["plain convert"] = measure(OURS, [str(src), args.to, "-", str(out)])
    rows["convert --lora"] = measure(OURS, [str(src), args.to, str(lora), str(out)])
    merge = measure(PEFT_MERGE, [str(src), str(lora), str(merged)])
    then = measure(OURS, [str(merged), args.to, "-", str(out)])
    rows["RWKV-PEFT merge"] = merge
    rows["  then convert"] = then
    for f in (out, merged):
        f.unlink(missing_ok=True)
    adapter_gb = lora.stat().st_size / 1e9
    bound = rows["plain convert"][1] + 2 * lora.stat().st_size / 2**30
    print(f"\n{src.name} ({src.stat().st_size / 1e9:.2f} GB) + {lora.name} ({adapter_gb:.3f} GB) -> --to {args.to}")
    print(f"{'step':<18}{'wall s':>9}{'peak RSS GB':>13}")
    for name, (wall, rss) in rows.items():
        print(f"{name:<18}{wall:>9.1f}{rss:>13.2f}")
    verdict = "within" if rows["convert --lora"][1] <= bound else "ABOVE"
    print(f"convert --lora peak {rows['convert --lora'][1]:.2f} GB: {verdict} plain + 2 x adapter = {bound:.2f} GB;"
          f" RWKV-PEFT's route writes a {src.stat().st_size / 1e9:.2f} GB merged .pth first and peaks at"
          f" {max(merge[1], then[1]):.2f} GB")


if __name__ == "__main__":
    main()
