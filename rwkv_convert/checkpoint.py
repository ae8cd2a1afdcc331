"""Reading BlinkDL `.pth` checkpoints safely and lazily (mmap; no code is ever unpickled)."""

from __future__ import annotations

import ctypes
import mmap
import os
import pickle
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .arch import build_spec, check_shapes
from .errors import RwkvConvertError
from .spec import ModelSpec


@dataclass
class Checkpoint:
    path: Path
    tensors: dict[str, torch.Tensor]  # mmap-backed: reading a tensor's data pages it in
    spec: ModelSpec
    unused_keys: list[str] = field(default_factory=list)
    mmapped: bool = True  # tensors are views of a read-only file mapping (False for legacy-format files)

    def release(self, name: str) -> None:
        """Done with a tensor: let the kernel drop its pages from this process's memory (they are read
        from the file again if it is used later), so that streaming conversions keep a small RSS."""
        if self.mmapped:
            drop_file_pages(self.tensors[name])

    @property
    def file_size(self) -> int:
        return self.path.stat().st_size


def check_input_file(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.exists():
        raise RwkvConvertError(f"{p}: no such file")
    if p.is_dir():
        raise RwkvConvertError(f"{p} is a directory; give the path of a checkpoint file inside it")
    if p.stat().st_size == 0:
        raise RwkvConvertError(f"{p} is empty (0 bytes); re-download or re-save the checkpoint")
    return p


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
    """The file's top-level dict (unwrapped from `state_dict`), and whether its tensors are mmap'd."""
    """torch.load with weights_only=True (plain tensors only) and mmap where the file allows it."""
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
            f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?): {reason[:160]}") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise RwkvConvertError(f"{path} holds a {type(obj).__name__}, not a dict of tensors")
    return obj, mmapped


def _tensors_only(path: Path, obj: dict) -> dict[str, torch.Tensor]:
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise RwkvConvertError(f"{path} holds no tensors; it is not an RWKV checkpoint")
    return tensors


def read_checkpoint(path: str | os.PathLike, raw: tuple[dict, bool] | None = None) -> Checkpoint:
    """An original checkpoint (raw: what load_raw already returned for it, to avoid reading it twice): a .pth,
    a BlinkDL-keyed or web-rwkv safetensors file, or a Hugging Face directory (v4 rwkv, v7 rwkv7)."""
    p = Path(path)
    if raw is None:
        weights = _safetensors_weights(p)
        if weights is not None:
            return _checkpoint(p, weights, mmapped=True)
    from .formats.onnx.runtime import is_onnx

    p = check_input_file(p)
    if is_onnx(p):
        raise RwkvConvertError(f"{p} is an ONNX export, not an original checkpoint: rwkv_convert.load(), run and"
                               " verify run it; convert from the source checkpoint")
    raw = raw or load_raw(p)
    if "_strategy" in raw[0]:
        raise RwkvConvertError(f"{p} is a file converted for the rwkv pip package, not an original checkpoint;"
                               " give the original .pth (rwkv_convert.load() runs converted files)")
    return _checkpoint(p, _tensors_only(p, raw[0]), raw[1])


def _safetensors_weights(p: Path) -> dict[str, torch.Tensor] | None:
    """BlinkDL-named tensors of a safetensors file or HF directory, or None for other inputs."""
    from .formats.hf import is_hf_dir, read_hf_dir
    from .formats.safetensors_io import is_safetensors, read_safetensors
    from .formats.web_rwkv import from_web_rwkv, looks_like_web_rwkv

    if is_hf_dir(p):
        return read_hf_dir(p)
    if not p.is_file() or not is_safetensors(p):
        return None
    tensors, meta = read_safetensors(p)
    if meta.get("rwkv_convert.layout") == "prepared":
        raise RwkvConvertError(f"{p} is a prepared file (weights already transformed for one strategy), not an"
                               " original checkpoint; rwkv_convert.load() runs it, convert from the source")
    return from_web_rwkv(tensors, meta) if looks_like_web_rwkv(tensors, meta) else tensors


def _checkpoint(p: Path, tensors: dict[str, torch.Tensor], mmapped: bool) -> Checkpoint:
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    dtypes = {k: str(v.dtype).removeprefix("torch.") for k, v in tensors.items()}
    spec = build_spec(shapes, dtypes, source=str(p))
    unused = check_shapes(spec, shapes, source=str(p))
    return Checkpoint(path=p, tensors=tensors, spec=spec, unused_keys=unused, mmapped=mmapped)
