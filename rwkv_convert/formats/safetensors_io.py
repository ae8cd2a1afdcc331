"""safetensors, read and written by us: a header check that turns every malformed file into one clear line,
zero-copy mmap reading, and a streaming writer (one tensor in memory at a time, atomic rename).

Format: 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets: [begin,
end]}, "__metadata__": {str: str}}, then the data; offsets are relative to the end of the header."""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import struct
import warnings
import zlib
from pathlib import Path

import torch

from ..errors import RwkvConvertError, brief
from ..spans import check_mapped_crcs, check_spans

MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "U32": torch.uint32}
NAMES = {v: k for k, v in DTYPES.items()}
# Our writer stores each tensor's CRC-32 here (JSON {name: crc}); the format itself keeps no checksum.
CHECKSUMS_KEY = "rwkv_convert.crc32"
# ... and the CRC-32 of the rest of the metadata (the spec, strategy and layout a reader trusts), from
# metadata_crc(). Files written before it lack the entry and are read without the check.
METADATA_CRC_KEY = "rwkv_convert.metadata_crc32"


def metadata_crc(metadata: dict[str, str]) -> int:
    """The CRC-32 of every metadata entry but METADATA_CRC_KEY, in a canonical form (sorted JSON)."""
    rest = sorted((k, v) for k, v in metadata.items() if k != METADATA_CRC_KEY)
    return zlib.crc32(json.dumps(rest, separators=(",", ":")).encode())


def is_safetensors(path) -> bool:
    """By name (.safetensors, .st) or by content: a header length then '{' (a .pth is a zip or a pickle),
    so that a damaged safetensors file gets the header checks' message, not torch.load's."""
    if Path(path).suffix.lower() in (".safetensors", ".st"):
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and not head.startswith(b"PK") and head[0] != 0x80


def read_header(path: Path) -> tuple[dict, dict, int]:
    """(tensors {name: (dtype, shape, begin, end)}, metadata, data_start), checked: every problem one line."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise RwkvConvertError(f"{path} is too short to be a safetensors file ({size} bytes)")
        n = struct.unpack("<Q", raw)[0]
        if n > MAX_HEADER:
            raise RwkvConvertError(f"{path} declares a {n:,}-byte safetensors header (the limit is {MAX_HEADER:,}):"
                                   " the file is corrupt or not safetensors")
        if n > size - 8:
            raise RwkvConvertError(f"{path} is truncated: its safetensors header needs {n:,} bytes, the file has"
                                   f" {size - 8:,} after the length")
        text = f.read(n)
    try:
        header = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RwkvConvertError(f"{path} has a corrupt safetensors header (not JSON: {e})") from None
    if not isinstance(header, dict):
        raise RwkvConvertError(f"{path} has a corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise RwkvConvertError(f"{path}: the safetensors __metadata__ must map strings to strings")
    data_start, data_size = 8 + n, size - 8 - n
    tensors: dict = {}
    for name, entry in header.items():
        if not isinstance(entry, dict):
            raise RwkvConvertError(f"{path}: safetensors entry {name!r} is malformed ({brief(entry, 120)})")
        try:
            dtype, shape, (begin, end) = DTYPES[entry["dtype"]], entry["shape"], entry["data_offsets"]
            # torch indexes sizes with int64: a larger dimension (even of an empty tensor) cannot be a tensor
            if not all(isinstance(d, int) and 0 <= d < 2 ** 63 for d in shape) or not isinstance(begin, int) \
                    or not isinstance(end, int):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise RwkvConvertError(f"{path}: safetensors entry {name!r} is malformed ({brief(entry, 120)})") from None
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * dtype.itemsize
        if not 0 <= begin <= end or end - begin != nbytes:
            raise RwkvConvertError(f"{path}: tensor {name!r} {entry['dtype']}{shape} needs {nbytes:,} bytes but its"
                                   f" offsets [{begin}, {end}] hold {end - begin:,}")
        if end > data_size:
            raise RwkvConvertError(f"{path}: tensor {name!r} ends at byte {end:,} of a {data_size:,}-byte data"
                                   " section (truncated file or bad offsets)")
        tensors[name] = (dtype, tuple(shape), begin, end)
    check_spans(path, [(b, e, name) for name, (_, _, b, e) in tensors.items() if e > b], packed_size=data_size)
    return tensors, metadata, data_start


def read_safetensors(path) -> tuple[dict[str, torch.Tensor], dict]:
    """Every tensor as a zero-copy view of a read-only file mapping (pages load on first use), and the
    metadata."""
    path = Path(path)
    entries, metadata, start = read_header(path)
    with open(path, "rb") as f:
        mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    if METADATA_CRC_KEY in metadata and metadata[METADATA_CRC_KEY] != str(metadata_crc(metadata)):
        raise RwkvConvertError(f"{path}: its metadata (model spec, layout) is not what was written: the header is"
                               " damaged; the file cannot be trusted")
    if CHECKSUMS_KEY in metadata:
        _check_checksums(path, mapping, entries, start, metadata[CHECKSUMS_KEY])
    tensors = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "buffer is not writable": the weights are never written to
        for name, (dtype, shape, begin, end) in entries.items():
            if name.startswith(SafetensorsWriter.PADDING_PREFIX):
                continue
            if end == begin:
                tensors[name] = torch.empty(shape, dtype=dtype)
            else:
                flat = torch.frombuffer(mapping, dtype=dtype, count=(end - begin) // dtype.itemsize,
                                        offset=start + begin)
                tensors[name] = flat.reshape(shape)
    return tensors, metadata


def _check_checksums(path: Path, mapping: mmap.mmap, entries: dict, start: int, stored: str) -> None:
    """Every tensor's bytes against the CRC-32 our writer stored, one tensor at a time (its pages are dropped
    after: memory does not grow with the file). A file of ours with a renamed, missing or altered tensor is
    refused here instead of being read as other weights."""
    try:
        crcs = json.loads(stored)
        if not isinstance(crcs, dict):
            raise ValueError
    except ValueError:
        raise RwkvConvertError(f"{path}: its {CHECKSUMS_KEY} metadata is damaged; the file cannot be trusted") from None
    names = {n for n in entries if not n.startswith(SafetensorsWriter.PADDING_PREFIX)}
    if set(crcs) != names:
        odd = sorted(names ^ set(crcs))[0]
        raise RwkvConvertError(f"{path}: tensor {odd!r} is not among the tensors the file was written with (its"
                               " header is damaged)")
    check_mapped_crcs(path, mapping, ((f"tensor {name!r}", start + entries[name][2], start + entries[name][3],
                                       crcs[name]) for name in names))


class SafetensorsWriter:
    """Tensors are appended to a scratch data file (PATH.data) as they come; close() writes the header to
    `path` and moves the data behind it (copy_file_range: in the kernel). `path` is the temp file of an
    AtomicOutput: publishing it is the caller's."""

    PADDING_PREFIX = "__padding__."

    def __init__(self, path: Path, align: int = 1):
        """align > 1: every tensor starts at a multiple of `align` bytes in the mapped file (64 lets vector
        kernels take the same path as on freshly allocated memory: bit-identical results). The gaps are
        filled by U8 tensors named __padding__.N, since safetensors files may not have holes."""
        self.path = Path(path)
        self.align = align
        self._data_tmp = self.path.with_name(self.path.name + ".data")
        self._data = open(self._data_tmp, "wb")  # noqa: SIM115 (closed in close/abort)
        self.entries: dict[str, dict] = {}
        self.crcs: dict[str, int] = {}
        self.nbytes = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        if name in self.entries:
            raise ValueError(f"duplicate tensor name {name}")
        t = t.detach().cpu().contiguous()
        gap = -self._data.tell() % self.align
        if gap and t.numel():
            start = self._data.tell()
            self._data.write(bytes(gap))
            self.entries[f"{self.PADDING_PREFIX}{len(self.entries)}"] = {
                "dtype": "U8", "shape": [gap], "data_offsets": [start, start + gap]}
        begin = self._data.tell()
        data = memoryview(t.view(torch.uint8).reshape(-1).numpy()) if t.numel() else b""
        self._data.write(data)
        self.crcs[name] = zlib.crc32(data)
        self.entries[name] = {"dtype": NAMES[t.dtype], "shape": list(t.shape),
                              "data_offsets": [begin, self._data.tell()]}
        self.nbytes = self._data.tell()

    def close(self, metadata: dict[str, str]) -> Path:
        try:
            self._data.close()
            metadata = {**metadata, CHECKSUMS_KEY: json.dumps(self.crcs, separators=(",", ":"))}
            metadata[METADATA_CRC_KEY] = str(metadata_crc(metadata))
            header = json.dumps({"__metadata__": metadata, **self.entries}, separators=(",", ":")).encode()
            header += b" " * (-(8 + len(header)) % max(self.align, 8))  # the data section starts aligned
            with open(self.path, "wb") as out, open(self._data_tmp, "rb") as data:
                out.write(struct.pack("<Q", len(header)) + header)
                out.flush()
                remaining = self.nbytes
                while remaining:
                    try:
                        copied = os.copy_file_range(data.fileno(), out.fileno(), remaining)
                    except (AttributeError, OSError):  # other systems / filesystems: plain copy
                        out.write(data.read(remaining))
                        copied = remaining
                    if copied == 0:
                        raise OSError("short copy")
                    remaining -= copied
        finally:
            self.abort()
        return self.path

    def abort(self) -> None:
        """Remove the scratch data file (after close(), or after a failure)."""
        self._data.close()
        with contextlib.suppress(FileNotFoundError):
            self._data_tmp.unlink()
