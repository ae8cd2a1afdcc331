"""What an export's files are called and how they are tagged: shared by the writer and the runtime, so that
reading an export never imports the exporter."""

from __future__ import annotations

from pathlib import Path

from ..errors import RwkvConvertError

FORMAT_TAG = "rwkv-convert-onnx-1"


def sequence_path(step_path: Path) -> Path:
    """model.onnx -> model.seq.onnx (the sequence graph beside the step graph)."""
    return step_path.with_name(step_path.stem + ".seq" + step_path.suffix)


def data_path(output: Path) -> Path:
    """The external weights file shared by the graphs of one export."""
    return output.with_name(output.name + ".data")

def onnx_module():
    try:
        import onnx
    except ImportError:
        raise RwkvConvertError("ONNX export needs the `onnx` package: pip install 'rwkv-convert[onnx]'") from None
    return onnx
