#!/usr/bin/env bash
# Wheels the GPU machine lacks (it has torch, numpy, safetensors, click, tokenizers, hypothesis, pytest, onnx,
# onnxruntime, transformers): the rwkv pip package (the anchor) and gguf, for Python 3.12 x86-64.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl rwkv==0.8.32 gguf==0.19.0
ls -la .whl
