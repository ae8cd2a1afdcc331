"""BlinkDL's original checkpoints: a torch.save'd dict of tensors (`.pth`), read with weights_only=True and
mmap. The registry's last resort: any file no other format claims is tried as one, so that a damaged
checkpoint gets torch's reason in one line."""

from __future__ import annotations

from ..checkpoint import Checkpoint, ZipRecordCheck, checkpoint_from_tensors, tensors_only
from ..errors import RwkvConvertError
from ..foreign import dequantize_scaled
from .base import Format, Probe


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


FORMAT = Format(name="pth", summary="an original BlinkDL checkpoint", runtime="BlinkDL's training code and the"
                " rwkv pip package", sniff=sniff, read=read)
