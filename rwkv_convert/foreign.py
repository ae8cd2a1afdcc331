"""Checkpoints that other tools have changed into something that is no longer plain RWKV weights: quantized
files (rwkv-quant-nv's fp8/int8/int4, GPTQ-style qweight/scales) and other architectures under RWKV-like
names (RWKV-8's ffn.enn). Nothing half-understood is run: what we implement is dequantized as it is read
(fp8 with a per-tensor or per-row scale), everything else is refused with what was found and what to do."""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterator, Mapping

import torch

from .errors import CastWarning, RwkvConvertError

# rwkv-quant-nv: KEY (float8_e4m3fn; int8 for its int8_symmetric scheme) and KEY.fp8_scale (fp32: one scalar, or
# one per row for fp8_perchannel); weight = stored * scale
FP8_SCALE = ".fp8_scale"
FLOAT8 = {d for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
          if (d := getattr(torch, name, None)) is not None}
SCALED = FLOAT8 | {torch.int8}
# the names other quantizers give the parts of a quantized tensor
_COMPANION = re.compile(r"(\.|_)(\w*scale\w*|qweight|qzeros|scales|g_idx|zeros?|absmax|quant_map|quant_state\S*|"
                        r"int[48]\w*|nf4\w*|packed\w*)$")


# Families of tensors that name another architecture outright (never run as the version they resemble)
OTHER_FAMILIES = ((re.compile(r"^blocks\.\d+\.ffn\.enn\."), "RWKV-8 (its FFN has ffn.enn, the per-token"
                   " expert embedding)"),)
_BLOCK_FAMILY = re.compile(r"^blocks\.\d+\.(\w+)")


class Dequantized(Mapping):
    """The checkpoint's tensors with fp8/int8 weights dequantized (to fp32) each time one is read, so memory
    stays that of one tensor; shapes and dtypes are known without reading."""

    def __init__(self, tensors: dict[str, torch.Tensor], scales: dict[str, torch.Tensor],
                 check_record: Callable[[str, torch.Tensor], None] | None):
        self._tensors, self._scales, self._check_record = tensors, scales, check_record
        self.shapes = {k: tuple(v.shape) for k, v in tensors.items()}
        self.dtypes = {k: "float32" if k in scales else str(v.dtype).removeprefix("torch.") for k, v in tensors.items()}

    def stored(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def __getitem__(self, name: str) -> torch.Tensor:
        t = self._tensors[name]
        if name not in self._scales:
            return t
        if self._check_record is not None:  # the stored fp8 bytes against their record's CRC
            self._check_record(name, t)
        scale = self._scales[name].float()
        return t.float() * (scale.reshape(-1, *[1] * (t.dim() - 1)) if scale.numel() > 1 else scale)

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


def dequantize_scaled(path, raw: dict, tensors: dict[str, torch.Tensor],
                      check_record: Callable[[str, torch.Tensor], None] | None) -> Mapping[str, torch.Tensor]:
    """rwkv-quant-nv's files (`rwkv-quant q -s fp8|fp8_perchannel|int8_symmetric`): each fp8 or int8 weight next
    to its `.fp8_scale` is read as weight * scale. Its other schemes store the rounded weights as floats: read
    as they are, with a note."""
    meta = raw.get("quant_meta")
    scales = {k[: -len(FP8_SCALE)]: v for k, v in tensors.items() if k.endswith(FP8_SCALE)}
    if isinstance(meta, dict) and not scales:
        warnings.warn(f"{path} was quantized by rwkv-quant (scheme {meta.get('scheme')!r}) and holds its rounded"
                      " weights as floats: they are read as they are", CastWarning, stacklevel=2)
    if not scales:  # other schemes' parts (.int8_scale, packed int4, ...) are refused by check_nothing_foreign
        return tensors
    for name, scale in scales.items():
        weight = tensors.get(name)
        if weight is None or weight.dtype not in SCALED:
            found = "no tensor" if weight is None else str(weight.dtype).removeprefix("torch.")
            raise RwkvConvertError(f"{path}: {name}{FP8_SCALE} scales {found} where an fp8 or int8 weight belongs;"
                                   " the file is not one rwkv-convert can read")
        if scale.numel() not in (1, weight.shape[0]):
            raise RwkvConvertError(f"{path}: {name}{FP8_SCALE} has {scale.numel()} values for a weight of"
                                   f" {weight.shape[0]} rows: neither per-tensor nor per-row")
    plain = {k: v for k, v in tensors.items() if not k.endswith(FP8_SCALE)}
    return Dequantized(plain, scales, check_record)


def check_nothing_foreign(path, spec, unused: list[str], dtypes: dict[str, str], ignored: re.Pattern | None) -> None:
    """Refuse keys a quantizer or another architecture added: the model would run without them, wrongly."""
    unused_set = set(unused)
    known = {n: dtypes[n] for n in dtypes if n not in unused_set}
    for name, dtype in known.items():
        if getattr(torch, dtype, None) in FLOAT8:
            raise RwkvConvertError(f"{path}: tensor {name} is {dtype} with no scale beside it: a quantized file"
                                   " rwkv-convert cannot dequantize - convert the original checkpoint instead")
    for name in unused:
        if ignored is not None and ignored.search(name):
            continue
        base = _COMPANION.sub("", name)
        if base != name and (base in known or base + ".weight" in known or base.removesuffix(".weight") in known):
            raise RwkvConvertError(f"{path}: {name} is the part of a quantized {base} that rwkv-convert does not"
                                   " read (another tool's quantization); convert the original checkpoint instead")
    strangers = [n for n in unused if n.startswith(("blocks.", "emb.", "head.", "ln_out."))
                 and not (ignored is not None and ignored.search(n))]
    if not strangers:
        return
    for pattern, family in OTHER_FAMILIES:
        found = next((n for n in strangers if pattern.search(n)), None)
        if found:
            raise RwkvConvertError(f"{path}: tensor {found} is not part of RWKV-{spec.version}: this is {family},"
                                   " which rwkv-convert does not run or convert; it is not run as RWKV-"
                                   + spec.version)
    families = sorted({_BLOCK_FAMILY.sub(r"blocks.i.\1", n).rsplit(".", 1)[0] + ".*" for n in strangers})
    raise RwkvConvertError(
        f"{path}: tensor {strangers[0]} is not part of RWKV-{spec.version}: this is another architecture, a hybrid"
        f" or a variant rwkv-convert does not know ({len(strangers)} such tensors, in {', '.join(families[:3])}"
        f"{' ...' if len(families) > 3 else ''}); it is not run as RWKV-{spec.version}")
