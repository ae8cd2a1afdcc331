"""Reading GGUF files: the tensors back as BlinkDL's (what llama.cpp's loader reads, checked against the layout
it expects), and the CRC-32s our files carry (GGUF keeps none: a flipped byte would otherwise run as other
weights), sealed by the writer and checked before any reader or llama.cpp trusts the bytes."""

from __future__ import annotations

import warnings
import zlib
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import Checkpoint, checkpoint_from_tensors
from ..errors import CastWarning, RwkvConvertError, brief, check_crc32
from ..precision import by_gguf
from ..spans import check_spans
from .gguf_tables import GLOBAL, READ_TABLES, Row

CHECKSUMS_KEY = "rwkv_convert.tensor_crc32"  # ours: each tensor's CRC-32, in tensor-info order (GGUF keeps none)
# ours: CRC-32 of everything before the tensor data (header, metadata, tensor infos), this value counted as zero.
# A flipped metadata value (rescale_every_n_layers 0 -> 1) otherwise read back as other weights.
METADATA_CHECKSUM_KEY = "rwkv_convert.metadata_crc32"


def gguf_module():
    try:
        import gguf
    except ImportError:
        raise RwkvConvertError("GGUF support needs the `gguf` package: pip install gguf") from None
    return gguf


def fill_checksums(gguf, path: Path, crcs: list[int]) -> None:
    reader = gguf.GGUFReader(path, "r+")
    field = reader.fields[CHECKSUMS_KEY]
    for index, crc in zip(field.data, crcs, strict=True):
        field.parts[index][0] = crc
    meta = reader.fields[METADATA_CHECKSUM_KEY]
    meta.parts[meta.data[0]][0] = zlib.crc32(metadata_bytes(reader, meta))
    reader.data.flush()
    del reader


def metadata_bytes(reader, field) -> bytearray:
    """The bytes before the tensor data, with `field`'s (the metadata checksum's own) 4 value bytes as zeros."""
    data = reader.data
    at = field.parts[field.data[0]].__array_interface__["data"][0] - data.__array_interface__["data"][0]
    section = bytearray(data[:reader.data_offset])
    section[at:at + 4] = bytes(4)
    return section


# ---- reading ---------------------------------------------------------------------------------------------
def _read_row(row: Row, get, i: int, head_size: int) -> dict[str, torch.Tensor]:
    """Our tensors back from the row's GGUF tensor (the inverse of _source)."""
    t = get(row.gguf.format(i=i))
    if row.layout == "t":
        t = t.t().contiguous()
    elif row.layout == "swap12":
        t = t.permute(0, 2, 1).contiguous()
    parts = [p.clone() for p in t.unbind(0)] if len(row.ours) > 1 else [t]
    if row.ours_shape is not None:
        shape = tuple(head_size if d == "N" else d for d in row.ours_shape)
        parts = [p.reshape(shape) for p in parts]
    return {key.format(i=i): part for key, part in zip(row.ours, parts, strict=True)}


def _checksums(path: Path, reader) -> dict[str, int] | None:
    """{tensor name: CRC-32 of its data} where our writer stored them (None in other writers' files)."""
    meta, field = reader.fields.get(METADATA_CHECKSUM_KEY), reader.fields.get(CHECKSUMS_KEY)
    crcs = [int(field.parts[i][0]) for i in field.data] if field is not None else None
    if crcs is not None and len(crcs) != len(reader.tensors):
        raise RwkvConvertError(f"{path}: {CHECKSUMS_KEY} has {len(crcs)} entries for {len(reader.tensors)} tensors;"
                               " the file is damaged")
    if meta is not None:
        try:
            check_crc32(path, "its metadata", metadata_bytes(reader, meta), int(meta.parts[meta.data[0]][0]))
        except RwkvConvertError:
            if crcs is None or _rewritten_tensors(reader, crcs) < 2:
                raise  # damage: a flipped byte changes the metadata or one tensor, not both
            # llama-quantize (and other tools) copy our keys into a file they rewrite: new metadata, new data
            warnings.warn(f"{path.name} was rewritten by another tool (llama-quantize?) after rwkv-convert wrote it:"
                          " its metadata and tensors no longer match the CRC-32s it carries, so they are not checked;"
                          " verify compares its outputs", CastWarning, stacklevel=3)
            return None
    if crcs is None:
        return None
    return {t.name: crc for t, crc in zip(reader.tensors, crcs, strict=True)}


def _rewritten_tensors(reader, crcs: list[int]) -> int:
    """How many tensors' data differ from the CRC-32s stored for them (a full read: only on a metadata mismatch)."""
    return sum(zlib.crc32(np.ascontiguousarray(t.data)) != crc for t, crc in zip(reader.tensors, crcs, strict=True))


def _open(path: Path):
    """A GGUFReader on the file, its tensor layout checked."""
    try:
        reader = gguf_module().GGUFReader(path)
    except Exception as e:  # the reader raises ValueError/struct errors on damaged files
        raise RwkvConvertError(f"{path} is not a readable GGUF file: {brief(e)}") from None
    _check_layout(path, reader)
    return reader


def _check_tensor(path: Path, tensor, crcs: dict[str, int] | None) -> None:
    if crcs is not None:
        check_crc32(path, f"tensor {tensor.name}", np.ascontiguousarray(tensor.data), crcs[tensor.name])


def check_checksums(path: Path) -> None:
    """Every tensor of one of our GGUFs against its stored CRC-32 (nothing to check in other writers' files)."""
    reader = _open(path)
    crcs = _checksums(path, reader)
    for tensor in reader.tensors:
        _check_tensor(path, tensor, crcs)


def _check_layout(path: Path, reader) -> None:
    """Tensor data aligned and never overlapping, as every GGUF writer lays it out: a damaged offset in the tensor
    infos (the format keeps no checksum) would otherwise read another tensor's bytes without a word."""
    field = reader.fields.get("general.alignment")
    align = int(field.parts[field.data[0]][0]) if field else 32
    spans = sorted((int(t.data_offset), int(t.data_offset) + int(t.n_bytes), t.name) for t in reader.tensors)
    for begin, _, name in spans:
        if align <= 0 or (begin - reader.data_offset) % align:
            raise RwkvConvertError(f"{path}: tensor {name} starts at byte {begin:,}, not on the file's {align}-byte"
                                   " alignment; the tensor infos are damaged")
    check_spans(path, [s for s in spans if s[1] > s[0]])  # gaps: alignment padding


def read_gguf(path: Path) -> Checkpoint:
    """An RWKV-6/7 GGUF (ours or upstream-converted with the same tensor set) as a BlinkDL-keyed checkpoint,
    dequantised to fp32 with the gguf package."""
    gguf = gguf_module()
    reader = _open(path)
    field = reader.fields.get("general.architecture")
    arch = bytes(field.parts[field.data[0]]).decode(errors="replace") if field else "?"
    if arch not in ("rwkv6", "rwkv7"):
        raise RwkvConvertError(f"{path} is a GGUF for architecture {arch!r}, not rwkv6 or rwkv7")

    def meta(key: str, default=None):
        f = reader.fields.get(f"{arch}.{key}")
        if f is None:
            if default is None:
                raise RwkvConvertError(f"{path} has no {arch}.{key}: it is damaged or not a complete {arch} GGUF")
            return default
        return int(f.parts[f.data[0]][0])

    tensors = {t.name: t for t in reader.tensors}
    crcs = _checksums(path, reader)

    def get(name: str) -> torch.Tensor:
        if name not in tensors:
            raise RwkvConvertError(f"{path}: tensor {name} is missing; this GGUF does not have llama.cpp's {arch}"
                                   " tensor set")
        t = tensors[name]
        _check_tensor(path, t, crcs)
        shape = tuple(int(d) for d in reversed(t.shape))  # ggml ne -> numpy order
        try:
            data = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
        except (ValueError, TypeError, NotImplementedError) as e:  # a type or shape its data does not fit
            raise RwkvConvertError(f"{path}: tensor {name} ({t.tensor_type.name}, {list(shape)}) cannot be read:"
                                   f" {brief(e)}; the file is damaged") from None
        return torch.from_numpy(np.array(data, dtype=np.float32))  # a writable copy of the mapped data

    n_layer, head_size = meta("block_count"), meta("wkv.head_size", 64)
    rescale_every = meta("rescale_every_n_layers", 0)
    sd: dict[str, torch.Tensor] = {}
    for row in GLOBAL:
        sd |= _read_row(row, get, 0, head_size)
    for i in range(n_layer):
        for row in READ_TABLES[arch]:
            if row.make is None and not (i == 0 and row.layer0):
                sd |= _read_row(row, get, i, head_size)
        if rescale_every > 0:  # undo a writer's fp16 rescale
            for key in (f"blocks.{i}.att.output.weight", f"blocks.{i}.ffn.value.weight"):
                sd[key] = sd[key] * 2 ** (i // rescale_every)
    return checkpoint_from_tensors(path, sd, mmapped=False)


def tensor_type_counts(path) -> dict[str, int]:
    """{GGML type name: how many tensors have it}, most common first."""
    counts: dict[str, int] = {}
    for t in _open(Path(path)).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def tensor_schemes(path) -> set[str]:
    """The GGUF's tensor types as their bounds in the precision table (4-6 bit blocks "q5/q4", 2-3 bit "q3/q2")."""
    return {by_gguf(t.tensor_type.name).bound for t in gguf_module().GGUFReader(path).tensors}

