"""rwkv-convert: load, run, quantize, export and verify RWKV (v4, v5.x, v6, v7) checkpoints."""

from __future__ import annotations

import os
from pathlib import Path

from .checkpoint import Checkpoint, read_checkpoint
from .errors import RwkvConvertError, UnsupportedError
from .runner import Model
from .spec import ModelSpec

__version__ = "0.1.0"



def load(path: str | os.PathLike, strategy: str | None = None) -> Model:
    """Read a model file and prepare it to run.

    - an original checkpoint (.pth) or an RWKV-6/7 GGUF: with `strategy` (default "cpu fp32");
    - an ONNX export of ours (.onnx): runs in onnxruntime (no strategy; it was fixed at export);
    - safetensors: BlinkDL-keyed or web-rwkv (.st) files and Hugging Face directories like a .pth; a prepared
      file with the strategy it was made for (`strategy` must be that one or None);
    - a file converted for the rwkv pip package: with the strategy it was made for (`strategy` must be that
      one or None)."""
    from .checkpoint import check_input_file, load_raw
    from .formats.gguf_file import is_gguf
    from .formats.hf import is_hf_dir
    from .formats.onnx.runtime import OnnxModel, is_onnx
    from .formats.pip_pth import read_pip_converted
    from .formats.prepared import read_prepared
    from .formats.safetensors_io import is_safetensors, read_header

    if is_hf_dir(Path(path)):
        return Model(read_checkpoint(path), "cpu fp32" if strategy is None else strategy)
    p = check_input_file(path)
    if is_safetensors(p):
        if read_header(p)[1].get("rwkv_convert.layout") == "prepared":
            return read_prepared(p, strategy)
        return Model(read_checkpoint(p), "cpu fp32" if strategy is None else strategy)
    if is_onnx(p):
        if strategy is not None:
            raise RwkvConvertError("an ONNX export runs as it was exported: drop the strategy")
        return OnnxModel(p)
    if is_gguf(p):
        from .formats.gguf_file import read_gguf

        return Model(read_gguf(p), "cpu fp32" if strategy is None else strategy)
    raw, mmapped = load_raw(p)
    if "_strategy" in raw:
        return read_pip_converted(p, raw, strategy)
    return Model(read_checkpoint(p, (raw, mmapped)), "cpu fp32" if strategy is None else strategy)


__all__ = ["Checkpoint", "Model", "ModelSpec", "RwkvConvertError", "UnsupportedError", "load", "read_checkpoint"]
