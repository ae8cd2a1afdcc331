"""Convert every fixture version to every target through the CLI (in process) and print a JSON map of
case -> exit code, last stderr line, and the SHA-256 of every file written. Run it on two commits with the
same fixture directory and compare the JSON: a refactoring that changes no behaviour writes the same bytes.

    python scripts/output-hashes.py FIXTURE_DIR > hashes.json
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

from click.testing import CliRunner

from rwkv_convert.cli import main
from rwkv_convert.fixtures import EXTRA_VARIANTS, VARIANTS, fixture_path

TARGETS = {
    "pip-fp32": ["--to", "pip", "--strategy", "cpu fp32"],
    "pip-mixed-i8": ["--to", "pip", "--strategy", "cpu fp16i8 *2 -> cpu fp32"],
    "gguf-f16": ["--to", "gguf", "--quant", "f16"],
    "gguf-q8_0": ["--to", "gguf", "--quant", "q8_0"],
    "gguf-strategy": ["--to", "gguf", "--strategy", "cpu fp32i8 *2 -> cpu fp16"],
    "onnx": ["--to", "onnx"],
    "onnx-fp16-int8": ["--to", "onnx", "--dtype", "fp16", "--onnx-quant", "int8"],
    "onnx-step-last": ["--to", "onnx", "--graph", "sequence", "--logits", "last"],
    "web-rwkv": ["--to", "safetensors", "--layout", "web-rwkv"],
    "hf": ["--to", "safetensors", "--layout", "hf"],
    "prepared": ["--to", "safetensors", "--layout", "prepared", "--strategy", "cpu fp32i8 *3 -> cpu bf16"],
}
SUFFIX = {"pip": ".pth", "gguf": ".gguf", "onnx": ".onnx", "web-rwkv": ".st", "hf": "", "prepared": ".safetensors"}


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main_(fixtures: Path) -> None:
    runner = CliRunner()
    results = {}
    for variant in VARIANTS + EXTRA_VARIANTS:
        for dtype in ("fp32", "bf16"):
            src = fixture_path(variant, dtype, directory=fixtures)
            for name, args in TARGETS.items():
                with tempfile.TemporaryDirectory() as tmp:
                    out = Path(tmp) / ("model" + SUFFIX[name.split("-")[0] if name != "web-rwkv" else name])
                    res = runner.invoke(main, ["convert", str(src), *args, "-o", str(out)])
                    files = {str(p.relative_to(tmp)): digest(p) for p in sorted(Path(tmp).rglob("*")) if p.is_file()}
                    err = [line for line in (res.stderr or "").splitlines() if line.startswith("error")]
                    results[f"{variant}/{dtype}/{name}"] = {"rc": res.exit_code, "error": err[-1] if err else None,
                                                           "files": files}
                    print(variant, dtype, name, res.exit_code, file=sys.stderr)
    json.dump(results, sys.stdout, indent=1, sort_keys=True)


if __name__ == "__main__":
    main_(Path(sys.argv[1]))
