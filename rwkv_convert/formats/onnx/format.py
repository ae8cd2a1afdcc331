"""The ONNX format's registry entry: written by export.py, run by runtime.py in onnxruntime."""

from __future__ import annotations

from ...errors import RwkvConvertError
from ...runtimes.onnx_layout import data_path, sequence_path
from ...runtimes.onnx_runtime import OnnxModel
from ..base import Format, Probe
from .export import OnnxOptions, supports, write


def load(probe: Probe, strategy: str | None) -> OnnxModel:
    if strategy is not None:
        raise RwkvConvertError("an ONNX export runs as it was exported: drop the strategy")
    return OnnxModel(probe.path)


FORMAT = Format(
    name="onnx", summary="an ONNX export", runtime="onnxruntime",
    sniff=lambda probe: probe.suffix == ".onnx",  # the format has no magic bytes
    load=load, write=write, options=OnnxOptions, supports=supports,
    files=lambda path: [f for f in (path, sequence_path(path), data_path(path)) if f.is_file()])
