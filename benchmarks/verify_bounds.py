"""Verification bounds at several model sizes: valid artifacts (each run in its client) and deliberately damaged
ones, scored with the fixed table alone and with the bounds calibrated on the model (verify's default). Prints,
per case, the worst metric's ratio to its bound (<= 1 passes): what docs/verification.md tabulates.

    python benchmarks/verify_bounds.py                      # v6 and v7 at L7 C128 V512, L12 C384 V8192, L12 C768 V65536
    python benchmarks/verify_bounds.py --sizes 7x128x512 --versions v7
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import torch

import rwkv_convert
from rwkv_convert.fixtures import make_state_dict
from rwkv_convert.verify import TWIN, candidate_run, reference_run, score

VALID = {  # name: (convert target, options, verify runner)
    "pip fp32 (ours)": ("pip", {"strategy": "cpu fp32"}, "ours"),
    "pip fp32i8 (pip)": ("pip", {"strategy": "cpu fp32i8"}, "client"),
    "pip fp16 (ours)": ("pip", {"strategy": "cpu fp16"}, "ours"),
    "gguf f16 (llama.cpp)": ("gguf", {"quant": "f16"}, "client"),
    "gguf q8_0 (llama.cpp)": ("gguf", {"quant": "q8_0"}, "client"),
    "onnx int8 (onnxruntime)": ("onnx", {"quant": "int8"}, "client"),
    "web-rwkv F16 (ours)": ("web-rwkv", {}, "ours"),
    "web-rwkv F16 (web-rwkv)": ("web-rwkv", {}, "client"),  # web-rwkv itself on any Vulkan device (lavapipe)
}
DAMAGED_TARGETS = {name: VALID[name] for name in ("pip fp32 (ours)", "gguf f16 (llama.cpp)", "pip fp32i8 (pip)",
                                                  "web-rwkv F16 (web-rwkv)")}
# The pip package cannot load converted RWKV-7 files: v7's fp32 and int8 files are prepared safetensors instead
# (run by our runner, which reproduces their strategy exactly: the same-strategy check applies to them too).
def _prepared(strategy: str) -> tuple:
    return "prepared", {"strategy": strategy}, "ours"


V7_INSTEAD = {"pip fp32 (ours)": ("prepared fp32 (ours)", _prepared("cpu fp32")),
              "pip fp32i8 (pip)": ("prepared fp32i8 (ours)", _prepared("cpu fp32i8")),
              "pip fp16 (ours)": ("prepared fp16 (ours)", _prepared("cpu fp16"))}


def for_version(version: str, targets: dict) -> dict:
    if version != "v7":
        return targets
    return dict(V7_INSTEAD.get(name, (name, spec)) for name, spec in targets.items())


def damage(sd: dict, how: str, n_layer: int) -> dict:
    sd = dict(sd)
    mid = n_layer // 2
    if how == "1% noise in one matrix":
        key = f"blocks.{mid}.att.output.weight"
        g = torch.Generator().manual_seed(1)
        sd[key] = sd[key] + torch.randn(sd[key].shape, generator=g) * sd[key].std() * 0.01
    elif how == "transposed matrix":
        key = f"blocks.{mid}.att.output.weight"
        sd[key] = sd[key].t().contiguous()
    elif how == "dropped rescale":  # what an fp16 file rescaled every 6 layers holds, with the rescale not recorded
        for i in range(n_layer):
            for key in (f"blocks.{i}.att.output.weight", f"blocks.{i}.ffn.value.weight"):
                sd[key] = sd[key] / 2 ** (i // 6)
    return sd


def worst_ratio(report) -> float:
    tol, worst = report.tolerance, 0.0
    for m in report.rows.values():
        worst = max(worst, m.max_abs / tol.max_abs, m.rel_l2 / tol.rel_l2, m.kl / tol.kl if tol.kl else 0,
                    (1 - m.top1) / max(1 - tol.top1, 1e-9))
    for m in report.twin.values():  # the same-strategy rows (pip/prepared files with fp32 activations)
        worst = max(worst, m.rel_l2 / TWIN.rel_l2, m.kl / TWIN.kl)
    return worst if math.isfinite(worst) else float("inf")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--versions", nargs="+", default=["v6", "v7"])
    parser.add_argument("--sizes", nargs="+", default=["7x128x512", "12x384x8192", "12x768x65536"])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--cases", nargs="+", default=None, help="only these artifacts (names as printed)")
    args = parser.parse_args()
    print(f"{'model':<24}{'artifact':<26}{'case':<24}{'table':>8}{'calibrated':>12}  verdict")
    with tempfile.TemporaryDirectory() as tmp:
        for version in args.versions:
            for size in args.sizes:
                n_layer, n_embd, vocab = (int(x) for x in size.split("x"))
                sd = make_state_dict(version, n_layer=n_layer, n_embd=n_embd, vocab=vocab)
                src = Path(tmp) / f"{version}-{size}.pth"
                torch.save(sd, src)
                ref = reference_run(src, args.tokens)
                cases = [(name, spec, "valid", src) for name, spec in for_version(version, VALID).items()]
                for how in ("1% noise in one matrix", "transposed matrix", "dropped rescale"):
                    bad = Path(tmp) / f"{version}-{size}-{how.replace(' ', '_').replace('%', '')}.pth"
                    torch.save(damage(sd, how, n_layer), bad)
                    cases += [(name, spec, how, bad) for name, spec in for_version(version, DAMAGED_TARGETS).items()]
                for name, (target, options, runner), case, source in cases:
                    if args.cases and name not in args.cases:
                        continue
                    out = Path(tmp) / {"onnx": "out.onnx", "pip": "out.pth", "web-rwkv": "out.st"}.get(target, "out")
                    try:
                        rwkv_convert.convert(source, target, out, **options)
                        cand = candidate_run(out, ref, runner=runner, reference=src)
                        if cand.note:  # its client did not run it: what we measure is its client
                            raise rwkv_convert.RwkvConvertError(cand.note)
                    except rwkv_convert.RwkvConvertError as e:
                        print(f"{version + ' L' + size:<24}{name:<26}{case:<24}  refused: {e}")
                        continue
                    table = worst_ratio(score(ref, cand, out, src, calibrate=False))
                    report = score(ref, cand, out, src)
                    ok = report.passed == (case == "valid")
                    verdict = ("PASS" if report.passed else "FAIL") + ("" if ok else "  <-- wrong")
                    print(f"{version + ' L' + size:<24}{name:<26}{case:<24}{table:>8.2f}{worst_ratio(report):>12.2f}"
                          f"  {verdict} ({report.worst})", flush=True)


if __name__ == "__main__":
    main()
