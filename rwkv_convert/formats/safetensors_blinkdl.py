"""safetensors files with BlinkDL's own tensor names and shapes (what `torch.save` of a checkpoint would hold,
saved with safetensors instead): read like a .pth, zero-copy."""

from __future__ import annotations

from ..checkpoint import Checkpoint, checkpoint_from_tensors
from .base import Format, Probe
from .safetensors_io import read_safetensors


def read(probe: Probe) -> Checkpoint:
    return checkpoint_from_tensors(probe.path, read_safetensors(probe.path)[0], mmapped=True)


FORMAT = Format(name="safetensors", summary="a BlinkDL-keyed safetensors checkpoint",
                runtime="rwkv-convert (read like a .pth)", sniff=lambda probe: probe.safetensors_header is not None,
                read=read)
