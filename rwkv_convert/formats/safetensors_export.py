"""`convert --to safetensors --layout web-rwkv|hf|prepared`: streamed, tensor by tensor, atomic."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import torch

from ..checkpoint import read_checkpoint
from ..errors import RwkvConvertError
from . import hf, web_rwkv
from .prepared import write_prepared
from .safetensors_io import SafetensorsWriter

LAYOUTS = ("web-rwkv", "hf", "prepared")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEFAULT_SHARD = 5 * 1024 ** 3


def convert_to_safetensors(source, output, layout: str, dtype: str | None = None, strategy: str | None = None,
                           shard_size: int = DEFAULT_SHARD, tokenizer=None) -> list[Path]:
    """Returns the files written (for hf: the directory's files)."""
    if layout not in LAYOUTS:
        raise RwkvConvertError(f"unknown safetensors layout {layout!r}; choose {', '.join(LAYOUTS)}")
    if strategy is not None and layout != "prepared":
        raise RwkvConvertError("--strategy applies to --layout prepared only (web-rwkv and hf hold raw weights)")
    if dtype is not None and layout == "prepared":
        raise RwkvConvertError("a prepared file takes its dtypes from --strategy, not --dtype")
    output = Path(output)
    parent = output.parent
    if not parent.is_dir():
        raise RwkvConvertError(f"output directory {parent} does not exist")
    try:
        if layout == "prepared":
            return [write_prepared(source, output, strategy or "cpu fp32")]
        if layout == "web-rwkv":
            return [_write_web_rwkv(source, output, dtype)]
        return _write_hf(source, output, dtype, shard_size, tokenizer)
    except OSError as e:
        raise RwkvConvertError(f"could not write {output}: {e.strerror or e}") from None


def _write_web_rwkv(source, output: Path, dtype: str | None) -> Path:
    if dtype not in (None, "fp16"):
        raise RwkvConvertError(f"web-rwkv's loader accepts only F16 tensors: drop --dtype {dtype} (or use"
                               " --layout hf or prepared)")
    ckpt = read_checkpoint(source)
    writer = SafetensorsWriter(output)
    try:
        for name, t in ckpt.tensors.items():
            writer.add(*web_rwkv.to_web_rwkv(name, t, ckpt.spec))
            ckpt.release(name)
        return writer.close(web_rwkv.metadata(ckpt.spec))
    except BaseException:
        writer.abort()
        raise


def _write_hf(source, output: Path, dtype: str | None, shard_size: int, tokenizer) -> list[Path]:
    ckpt = read_checkpoint(source)
    spec = ckpt.spec
    hf.supported(spec, ckpt.path)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise RwkvConvertError(f"{output} exists and is not an empty directory; an hf export writes a directory")
    if dtype is None:  # the file's own (most common) float type
        dtype = max(("fp32", "fp16", "bf16"), key=lambda d: spec.dtypes.get(str(DTYPES[d]).removeprefix("torch."), 0))
    if dtype not in DTYPES:
        raise RwkvConvertError(f"unknown dtype {dtype!r}; choose fp32, fp16 or bf16")
    target = DTYPES[dtype]
    jobs = []
    for name, t in ckpt.tensors.items():
        mapped = hf.hf_tensor(name, t, spec)
        if mapped is not None:
            jobs.append((name, *mapped))
    sizes = [t.numel() * target.itemsize for _, _, t in jobs]
    shards, current, used = [], [], 0
    for job, size in zip(jobs, sizes, strict=True):
        if current and used + size > shard_size:
            shards.append(current)
            current, used = [], 0
        current.append(job)
        used += size
    shards.append(current)
    tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    tmp.mkdir()
    try:
        names = [hf.WEIGHTS_NAME] if len(shards) == 1 else \
            [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
        weight_map = {}
        for shard, file_name in zip(shards, names, strict=True):
            writer = SafetensorsWriter(tmp / file_name)
            try:
                for src_name, hf_name, t in shard:
                    writer.add(hf_name, t.to(target))
                    weight_map[hf_name] = file_name
                    ckpt.release(src_name)
                writer.close({"format": "pt"})
            except BaseException:
                writer.abort()
                raise
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
            (tmp / hf.INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        cfg = hf.config(spec) | {"torch_dtype": str(target).removeprefix("torch."),
                                 "rwkv_convert_source": ckpt.path.name}
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        hf.write_tokenizer_files(tmp, spec, Path(tokenizer) if tokenizer else None)
        if output.exists():
            output.rmdir()  # empty (checked above)
        os.replace(tmp, output)
    finally:
        if tmp.exists():
            with contextlib.suppress(OSError):
                shutil.rmtree(tmp)
    return sorted(output.iterdir())
