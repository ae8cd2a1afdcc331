"""llama.cpp's importance matrix, both ways: read an `imatrix.gguf` (or the legacy `imatrix.dat`) that
llama-imatrix wrote as the per-column importance our GGUF quantizer rounds with (`convert --to gguf --imatrix`),
and write ours (`rwkv-convert imatrix`) as an `imatrix.gguf` that `llama-quantize --imatrix` reads.

What the file holds (llama.cpp's tools/imatrix and common/imatrix-loader): per matrix that llama.cpp multiplies
(its GGUF name, e.g. blk.3.time_mix_key.weight, output.weight), `NAME.in_sum2` F32 [n_mat, in] (the sum over
tokens of each input column's square) and `NAME.counts` F32 [n_mat, 1] (how many tokens), and the keys
general.type = "imatrix", imatrix.datasets, imatrix.chunk_count, imatrix.chunk_size. The legacy .dat: an int32
entry count; per entry its name (int32 length + bytes), ncall (int32), nval (int32) and nval float32 values
(mean square x ncall); then optionally the chunk count and the dataset name. The importance of a column is
in_sum2 / counts either way: the mean square of the activation that meets it, which is what our
calibration measures (calibration.activation_importance)."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import torch

from ..atomic import AtomicOutput
from ..calibration import BUNDLED, activation_importance, calibration_tokens
from ..checkpoint import Checkpoint
from ..errors import RwkvConvertError, brief
from .gguf_jobs import tensor_jobs
from .gguf_read import gguf_module

CHUNK = 1024  # our calibration windows: the chunk_size we record


def matrix_names(ckpt: Checkpoint) -> dict[str, str]:
    """{GGUF name: our key} of the matrices whose rows a GGUF file holds as ours (what an imatrix describes)."""
    return {job.name: job.source for job in tensor_jobs(ckpt) if job.quantizable and job.source
            and job.source != "emb.weight"}


def read_imatrix(path: str | Path, ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    """{our key: per-column importance [in]} from llama.cpp's imatrix.gguf or legacy .dat, checked against the
    model (an entry of another width or a file for another model is refused; names it lacks are ignored)."""
    p = Path(path)
    if not p.is_file():
        raise RwkvConvertError(f"{p}: no such importance matrix file")
    with open(p, "rb") as f:
        magic = f.read(4)
    entries = _read_gguf(p) if magic == b"GGUF" else _read_legacy(p)
    names, shapes = matrix_names(ckpt), ckpt.shapes
    out: dict[str, torch.Tensor] = {}
    for name, importance in entries.items():
        key = names.get(name)
        if key is None:
            continue
        width = shapes[key][-1]
        if importance.shape != (width,):
            raise RwkvConvertError(f"{p}: {name} has {importance.size} values and {ckpt.path.name}'s {key} has {width}"
                                   " inputs: the importance matrix was made for another model")
        if not np.isfinite(importance).all() or (importance < 0).any():
            raise RwkvConvertError(f"{p}: {name} holds negative, NaN or infinite values; the file is damaged")
        out[key] = torch.from_numpy(importance.astype(np.float32))
    if not out:
        raise RwkvConvertError(f"{p} has no entry for any matrix of {ckpt.path.name} (e.g. {next(iter(names))}): it"
                               " was made for another model or architecture")
    return out


def _mean(sums: np.ndarray, counts: np.ndarray, name: str, p: Path) -> np.ndarray:
    if counts.size != 1:  # several experts' matrices: RWKV has none
        raise RwkvConvertError(f"{p}: {name} is a mixture of {counts.size} experts' statistics; RWKV has no experts")
    if counts[0] <= 0:
        raise RwkvConvertError(f"{p}: {name} was never seen by the calibration text (count 0)")
    return sums.reshape(-1).astype(np.float64) / float(counts[0])


def _read_gguf(p: Path) -> dict[str, np.ndarray]:
    gguf = gguf_module()
    try:
        reader = gguf.GGUFReader(p)
    except Exception as e:  # gguf-py raises ValueError, struct errors, ... on damaged files
        raise RwkvConvertError(f"{p} is not a readable GGUF file ({brief(e)})") from None
    kind = reader.fields.get("general.type")
    if kind is None or bytes(kind.parts[kind.data[0]]).decode("utf-8", "replace") != "imatrix":
        raise RwkvConvertError(f"{p} is a GGUF file but not an importance matrix (general.type is not imatrix)")
    tensors = {t.name: t for t in reader.tensors}
    entries = {}
    for name, t in tensors.items():
        if not name.endswith(".in_sum2"):
            continue
        base = name.removesuffix(".in_sum2")
        counts = tensors.get(base + ".counts")
        if counts is None or t.tensor_type != gguf.GGMLQuantizationType.F32 or \
                counts.tensor_type != gguf.GGMLQuantizationType.F32:
            raise RwkvConvertError(f"{p}: {base} needs F32 .in_sum2 and .counts tensors")
        entries[base] = _mean(np.array(t.data, np.float32), np.array(counts.data, np.float32).reshape(-1), base, p)
    return entries


def _read_legacy(p: Path) -> dict[str, np.ndarray]:
    data = p.read_bytes()
    at = 0

    def take(fmt: str):
        nonlocal at
        size = struct.calcsize(fmt)
        if at + size > len(data):
            raise RwkvConvertError(f"{p} is neither a GGUF importance matrix nor a complete legacy imatrix.dat")
        values = struct.unpack_from(fmt, data, at)
        at += size
        return values

    (n,) = take("<i")
    if not 0 < n < 1_000_000:
        raise RwkvConvertError(f"{p} is neither a GGUF importance matrix nor a legacy imatrix.dat")
    entries = {}
    for _ in range(n):
        (length,) = take("<i")
        if not 0 < length < 4096:
            raise RwkvConvertError(f"{p}: a damaged legacy imatrix.dat (an entry name of {length} bytes)")
        name = bytes(take(f"<{length}s")[0]).decode("utf-8", "replace")
        ncall, nval = take("<ii")
        if not 0 < nval < 1 << 26:
            raise RwkvConvertError(f"{p}: a damaged legacy imatrix.dat ({name} has {nval} values)")
        sums = np.array(take(f"<{nval}f"), np.float32)
        entries[name] = _mean(sums, np.array([ncall], np.float32), name, p)
    return entries


def write_imatrix(ckpt: Checkpoint, output: str | Path, text: str | Path = BUNDLED) -> Path:
    """Our calibration's statistics (`text` run through the reference runner) as an imatrix.gguf llama-quantize
    reads: for every matrix llama.cpp multiplies, the sum of its inputs' squares and the token count."""
    gguf = gguf_module()
    importance = activation_importance(ckpt, text)
    tokens = len(calibration_tokens(ckpt, text))
    names = matrix_names(ckpt)
    writer = gguf.GGUFWriter(None, arch="")
    writer.add_string("general.type", "imatrix")
    writer.add_array("imatrix.datasets", [Path(str(text)).name])
    writer.add_uint32("imatrix.chunk_count", (tokens + CHUNK - 1) // CHUNK)
    writer.add_uint32("imatrix.chunk_size", CHUNK)
    for name in sorted(names):  # llama-imatrix's order
        mean_square = importance[names[name]].double().numpy()
        writer.add_tensor(f"{name}.in_sum2", (mean_square * tokens).astype(np.float32).reshape(1, -1))
        writer.add_tensor(f"{name}.counts", np.array([[tokens]], np.float32))
    out = Path(output)
    with AtomicOutput(out) as target:
        try:
            writer.write_header_to_file(target.temp())
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
    return out
