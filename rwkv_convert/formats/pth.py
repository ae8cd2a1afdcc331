"""BlinkDL's original checkpoints: a torch.save'd dict of tensors (`.pth`), read with weights_only=True and
mmap. The registry's last resort: any file no other format claims is tried as one, so that a damaged
checkpoint gets torch's reason in one line.

Written too (`--to pth`): the same layout, so that a model with adapters merged or a state applied, or one read
from GGUF, Hugging Face or safetensors, goes to any tool that reads BlinkDL files (the rwkv pip package,
RWKV-LM, RWKV-PEFT, rwkv.cpp's converter). Tensors keep their names, shapes and order; each keeps its dtype
(or --dtype casts them all); a learned state goes in as `blocks.i.att.time_state`, as state-tuned files hold it.
Written one tensor at a time (formats/torch_stream.py), atomically."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..atomic import AtomicOutput
from ..checkpoint import Checkpoint, ZipRecordCheck, checkpoint_from_tensors, tensors_only
from ..errors import RwkvConvertError
from ..foreign import dequantize_scaled
from .base import Format, Options, Probe, option
from .torch_stream import StreamingTorchWriter

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def sniff(probe: Probe) -> bool:
    return probe.path.is_file()


def read(probe: Probe) -> Checkpoint:
    if not probe.is_torch_file:
        raise RwkvConvertError(f"{probe.path} is not a readable PyTorch checkpoint (neither a zip nor a pickle),"
                               " nor a safetensors, GGUF or ONNX file, nor a Hugging Face directory")
    raw, mmapped = probe.torch_raw
    tensors = tensors_only(probe.path, raw)
    # mmapped files are zip archives (torch >= 1.6), whose records carry a CRC-32; legacy pickles have none
    check = ZipRecordCheck(probe.path, tensors) if mmapped else None
    return checkpoint_from_tensors(probe.path, dequantize_scaled(probe.path, raw, tensors, check), mmapped, check)


@dataclass(frozen=True)
class PthOptions(Options):
    dtype: str = option("source", "the tensors' type: source (each as read; a GGUF's are fp32), fp32, fp16 or bf16",
                        choices=("source", *DTYPES))


def write(ckpt: Checkpoint, output: Path, options: PthOptions) -> list[Path]:
    cast = DTYPES.get(options.dtype)
    skipped = set(ckpt.unused_keys)  # not part of the model (refused or ignored when read)
    with torch.no_grad(), AtomicOutput(output) as target, StreamingTorchWriter(target.temp()) as writer:
        for name in ckpt.tensors:
            if name in skipped:
                continue
            t = ckpt.tensors[name]
            writer.add(name, t if cast is None else t.to(cast))
            del t
            ckpt.release(name)
    return [output]


FORMAT = Format(name="pth", summary="an original BlinkDL checkpoint", runtime="BlinkDL's training code and the"
                " rwkv pip package", sniff=sniff, read=read, write=write, options=PthOptions)
