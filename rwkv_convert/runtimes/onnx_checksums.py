"""The CRC-32s our ONNX exports carry (ONNX keeps none, and onnxruntime runs altered weights as they are): one of
the model file itself (graph, inline weights, metadata: everything but this entry) and one per weight in the
external data file. Shared by the writer and the runtime, like layout.py."""

from __future__ import annotations

import json
import mmap
import zlib
from pathlib import Path

from ..errors import RwkvConvertError, brief, check_crc32
from ..spans import check_mapped_crcs

CHECKSUMS_KEY = "rwkv.checksums"  # JSON {"model": crc, "data": {initializer: crc}}


def _entry(model):
    return next((p for p in model.metadata_props if p.key == CHECKSUMS_KEY), None)


def seal(model, data_crcs: dict[str, int]) -> None:
    """Add the checksum entry to a finished model: the CRC-32 of the model as serialized without it, and those
    of its external weights."""
    if _entry(model) is not None:
        raise ValueError("the model is sealed already")
    model_crc = zlib.crc32(model.SerializeToString())
    entry = model.metadata_props.add()
    entry.key = CHECKSUMS_KEY
    entry.value = json.dumps({"model": model_crc, "data": data_crcs}, separators=(",", ":"))


def check(path: Path, onnx, checked: set) -> list[str]:
    """Refuse an ONNX model whose external data entries point outside its folder or past their files, or declare
    other sizes than their tensors (every model: onnxruntime trusts them), and an export of ours whose model
    file or external weights are not what was written. `checked` holds the (data file, offset, length) ranges
    already checked for a sibling graph, so shared weights are read once. Files without the checksum entry
    (other writers', or ours from before it) get the first check only. Returns the data files' locations."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and onnx's own errors
        raise RwkvConvertError(f"{path} is not a readable ONNX model ({brief(e, 160)})") from None
    spans = external_spans(path, model, onnx)
    locations = sorted({location for _, (location, _, _) in spans})
    entry = _entry(model)
    if entry is None:
        return locations
    try:
        stored = json.loads(entry.value)
        model_crc, data_crcs = int(stored["model"]), dict(stored["data"])
    except (ValueError, KeyError, TypeError):
        raise RwkvConvertError(f"{path}: its {CHECKSUMS_KEY} metadata is damaged; the file cannot be trusted") from None
    model.metadata_props.remove(entry)
    check_crc32(path, "the model", model.SerializeToString(), model_crc)
    # The model's checksum covers each weight's location, offset and length; what lies there is checked here.
    by_file: dict[str, list] = {}
    for name, span in spans:
        if span not in checked:
            by_file.setdefault(span[0], []).append((name, span))
    for location, tensors in by_file.items():
        _check_data(path.parent / location, tensors, data_crcs, checked)
    return locations


def _integer(text: str | None, default: int | None) -> int | None:
    if text is None:
        return default
    return int(text) if text.isascii() and text.isdigit() else None


def external_spans(path: Path, model, onnx) -> list[tuple[str, tuple[str, int, int]]]:
    """(initializer, (location, offset, length)) of every externally stored weight, each checked before any
    file it names is opened: the location a plain relative path inside the model's folder (no '..', not
    absolute, no link out of it), offset and length whole numbers within the data file, and the length the
    bytes the tensor's shape and type declare (no small file read as a huge tensor)."""
    # the folder as named, or the one the model file itself resolves to (a cache of links to blobs)
    folders = (path.parent.resolve(), path.resolve().parent)
    spans = []
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        where = f"{path}: weight {tensor.name!r} in external data"
        location = info.get("location", "")
        parts = Path(location).parts
        if not parts or Path(location).is_absolute() or ".." in parts or "\0" in location or "\\" in location:
            raise RwkvConvertError(f"{where} names {location!r}; a model's external data lies beside it in its"
                                   " folder - the file is damaged or hostile")
        data_file = (path.parent / location).resolve()
        if not any(data_file.is_relative_to(folder) for folder in folders):
            raise RwkvConvertError(f"{where} names {location!r}, which leads outside the model's folder; refusing it")
        offset, length = _integer(info.get("offset"), 0), _integer(info.get("length"), None)
        if offset is None or length is None:
            raise RwkvConvertError(f"{where} has offset {info.get('offset')!r} and length {info.get('length')!r}; both"
                                   " must be whole numbers (length is required) - the file is damaged")
        try:
            itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
        except (KeyError, ValueError, TypeError):
            raise RwkvConvertError(f"{where} has an unknown element type {tensor.data_type}") from None
        declared = itemsize
        for dim in tensor.dims:
            declared *= dim
        if tensor.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
            declared = (declared + 1) // 2
        if any(dim < 0 for dim in tensor.dims) or declared != length:
            raise RwkvConvertError(f"{where} declares shape {list(tensor.dims)} ({declared:,} bytes) but a length of"
                                   f" {length:,} bytes - the file is damaged")
        size = data_file.stat().st_size if data_file.is_file() else None
        if size is None:
            raise RwkvConvertError(f"{where} names {location!r}, which is not a file beside the model; copy the"
                                   " export with its data file")
        if offset + length > size:
            raise RwkvConvertError(f"{data_file} is shorter than its ONNX export needs (weight {tensor.name} ends"
                                   f" at byte {offset + length:,} of {size:,}): copy or convert the export again")
        spans.append((tensor.name, (location, offset, length)))
    return spans


def _check_data(data_file: Path, tensors: list, data_crcs: dict, checked: set) -> None:
    try:
        with open(data_file, "rb") as f:
            size = data_file.stat().st_size
            mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
    except OSError as e:
        raise RwkvConvertError(f"cannot read {data_file}, the weights of this ONNX export: {e.strerror}") from None
    for name, (_, offset, length) in tensors:
        if name not in data_crcs:
            raise RwkvConvertError(f"{data_file}: no CRC-32 is stored for weight {name}; the export's"
                                   f" {CHECKSUMS_KEY} metadata is damaged")
        if offset + length > size:
            raise RwkvConvertError(f"{data_file} is shorter than its ONNX export needs (weight {name} ends"
                                   f" at byte {offset + length} of {size}): copy or convert the export again")
    # (The mapping is closed only on success: an error's traceback still holds the slice it was raised on.)
    check_mapped_crcs(data_file, mapping, ((f"weight {name}", offset, offset + length, data_crcs[name])
                                           for name, (_, offset, length) in tensors))
    checked.update(span for _, span in tensors)
    if size:
        mapping.close()
