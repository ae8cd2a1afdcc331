"""Reading BlinkDL `.pth` checkpoints safely and lazily (mmap; no code is ever unpickled)."""

from __future__ import annotations

import ctypes
import hashlib
import mmap
import pickle
import re
import struct
import sys
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .arch import build_spec, check_shapes, module_for
from .errors import CastWarning, RwkvConvertError, brief, check_crc32
from .foreign import check_nothing_foreign
from .progress import step
from .spec import ModelSpec

CHECK_CHUNK = 1 << 22  # elements checked at once: a large table's check never holds copies of all of it


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def count_non_finite(t: torch.Tensor) -> int:
    flat = t.reshape(-1)
    return sum(int((~torch.isfinite(flat[i:i + CHECK_CHUNK])).sum()) for i in range(0, flat.numel(), CHECK_CHUNK))


class CheckedTensors(Mapping):
    """A checkpoint's tensors by name. Each is checked for NaN and infinity the first time it is read, which is
    while a conversion or the runner streams through it (no extra pass over the file), so a damaged or diverged
    checkpoint is refused with the tensor's name instead of being written or run."""

    def __init__(self, tensors: dict[str, torch.Tensor], source: Path, mmapped: bool,
                 check_record: Callable[[str, torch.Tensor], None] | None = None):
        self._tensors, self._source, self._mmapped, self._checked = tensors, source, mmapped, set()
        self._check_record = check_record
        self._in_memory: set[str] = set()  # tensors not backed by the file: dropping their pages would zero them
        self._edits: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}  # adapters.py: merged as read

    def unchecked(self, name: str) -> torch.Tensor:
        """The tensor as stored (the file's bytes: what release() drops the pages of)."""
        stored = getattr(self._tensors, "stored", None)
        return stored(name) if stored is not None else self._tensors[name]

    def __getitem__(self, name: str) -> torch.Tensor:
        t = self._tensors[name]
        if name not in self._checked:
            if self._check_record is not None:  # damaged bytes first: they are why values would be non-finite
                self._check_record(name, t)
            if t.is_floating_point() and t.numel():
                bad = count_non_finite(t)
                if bad:
                    raise RwkvConvertError(
                        f"{self._source}: tensor {name} holds {bad:,} NaN or infinite values (of {t.numel():,}); the"
                        " file is damaged or was saved from a diverged run - use another copy")
                self.drop_pages(name)  # checked ahead of its use: do not keep its pages resident until then
            self._checked.add(name)
            step("reading and checking tensors", len(self._checked), len(self._tensors))
        edit = self._edits.get(name)
        return t if edit is None else edit(t)

    def drop_pages(self, name: str, rows: slice | None = None) -> None:
        """Let the kernel drop the pages of a file-mapped tensor (or of these rows of it); they are read from
        the file again if used. Never for tensors in anonymous memory (a state file's): it would zero them."""
        if self._mmapped and name not in self._in_memory:
            stored = self.unchecked(name)
            drop_file_pages(stored if rows is None else stored[rows])

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def with_extra(self, extra: dict[str, torch.Tensor]) -> CheckedTensors:
        """These tensors and `extra` (which replace any of the same name; e.g. a state file's)."""
        merged = _Overlay(self._tensors, extra)
        out = CheckedTensors(merged, self._source, self._mmapped, self._check_record)
        out._checked = self._checked - set(extra)
        out._in_memory = self._in_memory | set(extra)
        out._edits = {k: e for k, e in self._edits.items() if k not in extra}
        return out

    def with_edits(self, edits: dict[str, Callable[[torch.Tensor], torch.Tensor]]) -> CheckedTensors:
        """These tensors with `edits` applied as each is read (after its check, on the stored tensor and any edit
        before it): an adapter merged while a conversion streams (adapters.py)."""
        out = CheckedTensors(self._tensors, self._source, self._mmapped, self._check_record)
        out._checked, out._in_memory, out._edits = self._checked, self._in_memory, dict(self._edits)
        for name, edit in edits.items():
            before = out._edits.get(name)
            out._edits[name] = edit if before is None else (lambda t, e=edit, b=before: e(b(t)))
        return out


class _Overlay(Mapping):
    def __init__(self, base: Mapping[str, torch.Tensor], extra: dict[str, torch.Tensor]):
        self._base, self._extra = base, extra

    def stored(self, name: str) -> torch.Tensor:
        if name in self._extra:
            return self._extra[name]
        stored = getattr(self._base, "stored", None)
        return stored(name) if stored is not None else self._base[name]

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._extra[name] if name in self._extra else self._base[name]

    def __iter__(self) -> Iterator[str]:
        yield from self._base
        yield from (k for k in self._extra if k not in self._base)

    def __len__(self) -> int:
        return len(self._base) + sum(1 for k in self._extra if k not in self._base)


@dataclass
class Checkpoint:
    path: Path
    tensors: Mapping[str, torch.Tensor]  # mmap-backed: reading a tensor's data pages it in (and checks it)
    spec: ModelSpec
    unused_keys: list[str] = field(default_factory=list)
    mmapped: bool = True  # tensors are views of a read-only file mapping (False for legacy-format files)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # without reading (or checking) any data
    applied_state: Path | None = None  # the state file applied to these weights (state_file.with_state)
    applied_adapters: tuple = ()  # adapters.AppliedAdapter, in the order merged (adapters.with_adapters)

    def release(self, name: str, rows: slice | None = None) -> None:
        """Done with a tensor (or with these rows of it): let the kernel drop its pages from this process's
        memory (they are read from the file again if it is used later), so that streaming conversions keep a
        small RSS."""
        if isinstance(self.tensors, CheckedTensors):
            self.tensors.drop_pages(name, rows)
        elif self.mmapped:
            drop_file_pages(self.tensors[name] if rows is None else self.tensors[name][rows])

    @property
    def file_size(self) -> int:
        return self.path.stat().st_size


_PAGE = mmap.PAGESIZE
_MADV_DONTNEED = 4
_libc = None


def drop_file_pages(t: torch.Tensor) -> None:
    """madvise(MADV_DONTNEED) on the whole pages inside a file-mapped tensor (Linux; no-op elsewhere).
    Only for tensors backed by a file mapping: on anonymous memory it would zero the data."""
    global _libc
    if sys.platform != "linux" or t.device.type != "cpu" or t.numel() == 0:
        return
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    first, last = -(-start // _PAGE) * _PAGE, end // _PAGE * _PAGE
    if last > first:
        _libc.madvise(first, last - first, _MADV_DONTNEED)


def _torch_load(path: Path):
    """(state, mmapped)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True), True
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise
        # Files written by torch < 1.6 (legacy, non-zip) cannot be mapped; read them into memory.
        return torch.load(path, map_location="cpu", weights_only=True), False


def load_raw(path: Path) -> tuple[dict, bool]:
    """The file's top-level dict (unwrapped from `state_dict`), and whether its tensors are mmap'd: torch.load
    with weights_only=True (plain tensors only) and mmap where the file allows it."""
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols on its way to refusing a file
            warnings.simplefilter("ignore")
            obj, mmapped = _torch_load(path)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        detail = f"it asks for the Python object {found.group(1)}" if found else ""
        raise RwkvConvertError(
            f"refusing to load {path}: it is a pickle that would run code or build objects other than tensors"
            f" ({detail or 'rejected by weights_only=True'}); only plain tensor dicts are read"
            " - re-save it with torch.save(model.state_dict())") from None
    except Exception as e:  # torch raises many types for damaged files (RuntimeError, EOFError, KeyError, ...)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RwkvConvertError(
            f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?): {brief(reason)}") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise RwkvConvertError(f"{path} holds a {type(obj).__name__}, not a dict of tensors")
    check_tensor_records(path, obj)
    return obj, mmapped


def _overlaps(t: torch.Tensor) -> bool:
    """Whether two elements of the tensor share bytes (a stride-0 or aliasing view): its dimensions, by stride,
    must each step past everything the smaller ones cover."""
    covered = 1
    dims = sorted(((st, s) for s, st in zip(t.shape, t.stride(), strict=True) if s > 1))
    for stride, size in dims:
        if stride < covered:
            return True
        covered = stride * size
    return False


def check_tensor_records(path: Path, obj: dict) -> None:
    """Declared sizes against the bytes behind them, before any tensor is used: a pickle can declare a view
    of any shape over a small record (stride 0 expands 6 MB into 2 x 32 GB that a runner would then allocate),
    or many tensors over one record. Every tensor must be dense (no sparse layouts), no two of its elements
    may share bytes, and the tensors together may not claim more bytes than their records hold."""
    records: dict[int, int] = {}
    claimed = 0
    for name, t in obj.items():
        if not isinstance(t, torch.Tensor):
            continue
        if t.layout != torch.strided:
            raise RwkvConvertError(f"{path}: tensor {name} is a {str(t.layout).removeprefix('torch.')} tensor;"
                                   " checkpoint weights are dense tensors - the file is damaged or not a checkpoint")
        if t.numel() == 0:
            continue
        if _overlaps(t):
            raise RwkvConvertError(f"{path}: tensor {name} declares {list(t.shape)} with strides {list(t.stride())},"
                                   " a view whose elements share bytes (it declares more than its bytes); refusing"
                                   " it - the file is damaged or built to exhaust memory")
        storage = t.untyped_storage()
        records[storage.data_ptr()] = storage.nbytes()
        claimed += t.numel() * t.element_size()
    held = sum(records.values())
    if claimed > held:
        raise RwkvConvertError(f"{path}: its tensors declare {claimed:,} bytes but their records hold {held:,};"
                               " tensors that are views of each other's bytes are not a checkpoint - the file is"
                               " damaged or built to exhaust memory")


_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, then (at byte 26) the name and extra-field lengths


class ZipRecordCheck:
    """Checks each tensor's bytes against the CRC-32 its zip record was written with, the first time the tensor is
    read. torch.load(mmap=True) maps the records without checking them, so a flipped byte would otherwise be
    converted silently. A record's data lies at a fixed offset in the file and torch maps each storage at base +
    that offset, so storages are matched to records by their addresses (no name is kept by torch)."""

    def __init__(self, path: Path, tensors: dict[str, torch.Tensor]):
        self.path = path
        try:
            with zipfile.ZipFile(path) as archive, open(path, "rb") as f:
                records = {}
                for info in archive.infolist():
                    if "/data/" not in info.filename:
                        # data.pkl (shapes, strides, dtypes) and the small records: torch does not check their
                        # CRC either; zipfile does as it reads them (BadZipFile on a mismatch)
                        archive.read(info)
                        continue
                    if not info.file_size:
                        continue
                    f.seek(info.header_offset)
                    magic, name_len, extra_len = _LOCAL_HEADER.unpack(f.read(_LOCAL_HEADER.size))
                    if magic != b"PK\x03\x04":
                        raise zipfile.BadZipFile(f"no local header for {info.filename}")
                    start = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
                    records[start] = (info.filename.partition("/")[2], info.file_size, info.CRC)
        except (zipfile.BadZipFile, struct.error, OSError, EOFError, ValueError, NotImplementedError) as e:
            raise RwkvConvertError(f"{path} is a damaged PyTorch checkpoint ({brief(e)}); download or copy it"
                                   " again") from None
        storages = {}
        for t in tensors.values():
            storage = t.untyped_storage()
            if storage.nbytes():
                storages[storage.data_ptr()] = storage.nbytes()
        self._by_address: dict[int, tuple[str, int, int]] = {}
        self._checked: set[int] = set()
        if not storages:
            return
        # The lowest storage is one of the records (the first, unless the dict skips some of the file's tensors).
        for first in sorted(records):
            base = min(storages) - first
            found = {address: records.get(address - base) for address in storages}
            if all(r is not None and r[1] == storages[a] for a, r in found.items()):
                self._by_address = found
                return
        raise RwkvConvertError(f"{path}: its tensors' data is not where the zip directory puts its records; the"
                               " archive is damaged - download or copy it again")

    def __call__(self, name: str, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        address = storage.data_ptr()
        if address in self._checked or address not in self._by_address:
            return
        record, _, crc = self._by_address[address]
        data = torch.empty(0, dtype=torch.uint8).set_(storage).numpy()
        check_crc32(self.path, f"tensor {name} (record {record})", data, crc, "the archive stores for them")
        self._checked.add(address)


def tensors_only(path: Path, obj: dict) -> dict[str, torch.Tensor]:
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise RwkvConvertError(f"{path} holds no tensors; it is not an RWKV checkpoint")
    return tensors


def checkpoint_from_tensors(p: Path, tensors: Mapping[str, torch.Tensor], mmapped: bool,
                            check_record: Callable[[str, torch.Tensor], None] | None = None) -> Checkpoint:
    """BlinkDL-named tensors (from any reader) as a Checkpoint: the version detected, every shape checked,
    other tools' quantization and other architectures refused. check_record(name, tensor), where given,
    checks a tensor's stored bytes the first time it is read."""
    if hasattr(tensors, "shapes"):  # Dequantized, formats/mlx.py's groups: known without dequantizing
        shapes, dtypes = tensors.shapes, tensors.dtypes
    else:
        shapes = {k: tuple(v.shape) for k, v in tensors.items()}
        dtypes = {k: str(v.dtype).removeprefix("torch.") for k, v in tensors.items()}
    spec = build_spec(shapes, dtypes, source=str(p))
    unused = check_shapes(spec, shapes, source=str(p))
    check_nothing_foreign(p, spec, unused, dtypes, getattr(module_for(spec.version), "IGNORED_KEYS", None))
    unused_set = set(unused)
    used = [k for k in tensors if k not in unused_set]
    for name in used:  # integers, booleans or complex numbers cannot be a weight: a cast would lose or invent values
        if not getattr(torch, dtypes[name]).is_floating_point:
            raise RwkvConvertError(f"{p}: tensor {name} is {dtypes[name]}; RWKV weights are floating point (fp32,"
                                   " fp16, bf16 or fp64) - the file is damaged or not a checkpoint of weights")
    wide = [name for name in used if dtypes[name] == "float64"]
    if wide:
        warnings.warn(f"{len(wide)} float64 tensors (e.g. {wide[0]}) are cast to float32 or narrower as they are"
                      " read: no format or runtime here holds fp64 weights", CastWarning, stacklevel=2)
    return Checkpoint(path=p, tensors=CheckedTensors(tensors, p, mmapped, check_record), spec=spec, unused_keys=unused,
                      mmapped=mmapped, shapes=shapes)
