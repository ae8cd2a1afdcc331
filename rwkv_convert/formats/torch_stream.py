"""Writing a `torch.save`-compatible file one tensor at a time.

torch.save pickles the whole object first and so needs every tensor in memory at once. This writer puts
each tensor's bytes into the zip archive as soon as it is given (so the caller can free it) and writes
the small pickle that references them at the end. `torch.load(weights_only=True, mmap=True)` reads it."""

from __future__ import annotations

import io
import os
import pickle
import sys
from collections import OrderedDict
from pathlib import Path

import torch

_STORAGE_TYPES = {dtype: getattr(torch, name) for dtype, name in torch.storage._dtype_to_storage_type_map().items()
                  if hasattr(torch, name)}


class _StorageRef:
    def __init__(self, key: str, dtype: torch.dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel


class _TensorRef:
    def __init__(self, storage: _StorageRef, shape, stride):
        self.storage, self.shape, self.stride = storage, shape, stride

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2, (self.storage, 0, self.shape, self.stride, False, OrderedDict()))


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _StorageRef):
            return ("storage", _STORAGE_TYPES[obj.dtype], obj.key, "cpu", obj.numel)
        return None


class _Sink:
    """The file under the zip writer. Errors must never be raised into the writer (its C++ code is not
    exception-safe: it aborts the process), so a failed write (e.g. a full disk) is recorded, later writes
    are skipped, and StreamingTorchWriter raises the recorded error itself."""

    def __init__(self, path: Path):
        self.file = open(path, "wb", buffering=0)  # noqa: SIM115 - closed by StreamingTorchWriter
        self.error: OSError | None = None

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        done = 0
        try:
            while self.error is None and done < len(view):  # unbuffered writes may be partial
                n = self.file.write(view[done:])
                if not n:
                    raise OSError(28, "No space left on device")
                done += n
        except OSError as e:
            self.error = e
        return len(view)

    def flush(self) -> None:
        pass


class StreamingTorchWriter:
    """with StreamingTorchWriter(path) as w: w.add("name", tensor); w.add_value("_meta", "x")
    `path` is the temp file of an AtomicOutput, which publishes it (or removes it) and words any OSError."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._sink = _Sink(self.path)
        self._zip = torch._C.PyTorchFileWriter(self._sink)
        self._entries: dict[str, object] = {}
        self._n = 0
        self._done = False

    def add(self, name: str, tensor: torch.Tensor) -> None:
        t = tensor.detach().to("cpu")
        # A transposed matrix keeps its layout, as torch.save keeps it: the pip package multiplies with the
        # column-major view its own load makes, and some CPUs' bf16 kernels round differently by layout.
        if not (t.is_contiguous() or (t.dim() == 2 and t.t().is_contiguous())):
            t = t.contiguous()
        if t.storage_offset() != 0 or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone(memory_format=torch.preserve_format)  # a view into a larger storage: only its own bytes
        key = str(self._n)
        self._n += 1
        self._zip.write_record(f"data/{key}", t.untyped_storage(), t.numel() * t.element_size())
        if self._sink.error is not None:  # e.g. the disk is full: stop now
            raise self._sink.error
        self._entries[name] = _TensorRef(_StorageRef(key, t.dtype, t.numel()), tuple(t.shape), t.stride())

    def add_value(self, name: str, value: str | int | float) -> None:
        self._entries[name] = value

    def close(self) -> None:
        try:
            self._finish()
        except RuntimeError as e:  # the zip writer's own failures
            raise OSError(str(e).splitlines()[0][:200]) from None
        if self._sink.error is not None:
            raise self._sink.error
        os.fsync(self._sink.file.fileno())
        self._sink.file.close()

    def _finish(self) -> None:
        buf = io.BytesIO()
        _Pickler(buf, protocol=2).dump(self._entries)
        data = buf.getvalue()
        self._zip.write_record("data.pkl", data, len(data))
        self._zip.write_record(".format_version", "1", 1)
        self._zip.write_record("byteorder", sys.byteorder, len(sys.byteorder))
        self._zip.write_end_of_file()
        self._done = True

    def __enter__(self) -> StreamingTorchWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self.close()
            except BaseException:
                self._discard()
                raise
            return
        self._discard()

    def _discard(self) -> None:
        self._sink.error = self._sink.error or OSError("discarded")  # the writer's destructor writes nothing
        self._zip = None
        self._sink.file.close()
