"""mlx-lm model directories (Apple's MLX; LM Studio's MLX engine): RWKV-7 under the fla-hub names mlx-lm's
models/rwkv7.py loads (the same as our hf export), `model.safetensors` and `config.json`, with the World
tokenizer (rwkv7-hf's RWKV7Tokenizer, its code and chat template beside it) for `mlx_lm.load`.

--quant writes MLX's own affine groups (quant/mlx_groups.py), as `mlx_lm.convert -q` does: each quantized
layer's `weight` (packed uint32), `scales` and `biases`, and `"quantization": {"group_size", "bits", "mode"}` in
config.json with per-layer entries where a layer differs. Which layers and at how many bits follows mlx-lm's
rwkv7 predicate: every Linear and the embedding whose rows are whole groups, the embedding and the LoRAs' last
projections at 8 bits, the rest at --quant's; --tables float keeps the embedding and the head in --dtype.
Plain groups are MLX's rounding bit for bit; --calibration chooses each group's scale and bias from the
calibration text's activations and (gptq, the default) rounds the attention and FFN matrices and the head with
GPTQ, layer by layer (the LoRAs and the embedding keep MLX's rounding)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ..atomic import AtomicOutput
from ..calibration import LayerwiseGptq, activation_importance
from ..checkpoint import Checkpoint, checkpoint_from_tensors
from ..errors import RwkvConvertError
from ..precision import by_mlx, float_bound, mlx_quants
from ..quant import mlx_groups
from ..quant.gptq import quantize_with
from ..runtimes.base import ClientRun, verify_modes
from ..runtimes.mlx_lm import CLIENT as MLX_LM
from ..runtimes.mlx_lm import MlxSession
from ..spec import ModelSpec
from . import hf
from .base import Format, Options, Probe, calibration_method_option, option, per_token_tables_refusal
from .hf_files import generation_config, write_json, write_tokenizer_code, write_tokenizer_files
from .safetensors_io import SafetensorsWriter, read_safetensors

WEIGHTS = "model.safetensors"
LAYOUT_KEY = "rwkv_convert_layout"  # in config.json: tells our reader this directory from an hf one
TABLE_BITS = 8  # mlx-lm's rwkv7 predicate: the embedding and every "lora.2" at 8 bits
PER_HEAD = ("k_k", "k_a", "g_norm")  # stored [heads, head size], as mlx-lm's sanitize leaves them (and saves them)


def _per_head(hf_name: str) -> bool:
    return any(f".{part}" in hf_name for part in PER_HEAD)


@dataclass(frozen=True)
class MlxOptions(Options):
    dtype: str | None = option(None, "the weights' float type, and the quantized groups' scales and biases' (default:"
                                     " the source's)", choices=tuple(hf.DTYPES))
    quant: str = option("none", "MLX affine groups of this many bits (q8, q6, q4, q3); the embedding and the LoRAs'"
                                " last projections at 8 bits, as mlx-lm's convert", choices=("none", *mlx_quants()),
                        storage="mlx")
    group_size: int = option(64, "with --quant: values per group (a scale and a bias each)",
                             choices=mlx_groups.GROUP_SIZES)
    tables: str = option("q8", "with --quant: the embedding at 8 bits and the head at --quant's, as mlx-lm (q8), or"
                               " both in --dtype (float)", choices=("q8", "float"))
    calibration: str | None = option(None, "with --quant: a text (or 'bundled') whose activations choose each group's"
                                           " scale and bias (and GPTQ's rounding, see --calibration-method)")
    calibration_method: str = calibration_method_option()
    tokenizer: str | None = option(None, "a tokenizer.json to ship instead of the World vocabulary's")

    @property
    def bits(self) -> int | None:
        """--quant's bits (q4: 4), None without --quant."""
        return None if self.quant == "none" else int(self.quant[1:])

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.calibration and self.quant == "none":
            raise RwkvConvertError("--calibration chooses quantized groups: give --quant q8, q6, q4 or q3")


def supports(spec: ModelSpec) -> str | None:
    if spec.version != "7":
        return (f"mlx-lm runs RWKV-7 only (its models/rwkv7.py), not RWKV-{spec.version}; use --to gguf, --to onnx"
                " or --to hf")
    if spec.time_state:
        return ("this is a state-tuned model (att.time_state): mlx-lm has no place for its learned initial state; use"
                " --to web-rwkv, --to prepared or --to onnx, which keep it")
    return per_token_tables_refusal(spec, "mlx-lm's rwkv7")


def _bits_of(hf_name: str, t: torch.Tensor, options: MlxOptions) -> int | None:
    """How many bits a tensor is stored at (None: in --dtype), by mlx-lm's predicate for rwkv7."""
    if options.quant == "none" or t.dim() != 2 or not hf_name.endswith(".weight") or "norm" in hf_name:
        return None
    if t.shape[-1] % options.group_size:  # mlx-lm leaves rows that are not whole groups in float
        return None
    table = "embeddings" in hf_name or hf_name == "lm_head.weight"
    if table and options.tables == "float":
        return None
    return TABLE_BITS if "lora.2" in hf_name or "embeddings" in hf_name else options.bits


class _Quantizer:
    """Each quantized tensor as (packed, scales, biases, values held): MLX's rounding, or the calibrated fit."""

    def __init__(self, ckpt: Checkpoint, options: MlxOptions, dtype: torch.dtype, planned: dict[str, int]):
        self.options, self.dtype, self.gptq, self.importance = options, dtype, None, None
        if not options.calibration:
            return
        text = options.calibration
        self.importance = activation_importance(ckpt, text, head_covariance=options.calibration_method == "gptq")
        if options.calibration_method == "gptq":
            head = self.importance["head.weight"]
            self.importance["head.weight"] = torch.diagonal(head).float()
            matrices = {key: bits for key, bits in planned.items() if key in self.importance and key != "emb.weight"}
            self.gptq = LayerwiseGptq(ckpt, text, head_moments=head, qtypes={
                key: self._gptq_one(bits) for key, bits in matrices.items()})

    def _gptq_one(self, bits: int):
        def quantize(weight: torch.Tensor, hessian):
            codec = mlx_groups.codec(bits, self.options.group_size, self.dtype)
            records, values = quantize_with(weight.numpy(), hessian, codec)
            made = mlx_groups.from_records(records, *weight.shape, bits, self.options.group_size, self.dtype)
            return made, values
        return quantize

    def __call__(self, key: str, t: torch.Tensor, bits: int):
        if self.gptq is not None and key in self.gptq:
            return self.gptq.blocks(key)
        if self.importance is not None and key in self.importance and key != "emb.weight":
            return mlx_groups.quantize_weighted(t.float(), self.importance[key], bits, self.options.group_size,
                                                self.dtype)
        return mlx_groups.quantize_plain(t, bits, self.options.group_size, self.dtype)


def write(ckpt: Checkpoint, output: Path, options: MlxOptions) -> list[Path]:
    spec = ckpt.spec
    dtype = hf.DTYPES[options.dtype or hf.source_dtype(spec)]
    jobs = [(name, *mapped) for name, t in ckpt.tensors.items() if (mapped := hf.hf_tensor(name, t, spec))]
    planned = {name: bits for name, hf_name, t in jobs if (bits := _bits_of(hf_name, t, options))}
    quantizer = _Quantizer(ckpt, options, dtype, planned)  # calibrates before anything is written
    layers: dict[str, dict] = {}
    with AtomicOutput(output, directory=True) as out:
        tmp = out.temp()
        writer = SafetensorsWriter(tmp / WEIGHTS)
        try:
            for name, hf_name, t in jobs:
                bits = planned.get(name)
                if bits is None:
                    shaped = t.reshape(spec.n_head, spec.head_size) if _per_head(hf_name) else t
                    writer.add(hf_name, shaped.to(dtype))
                else:
                    packed, scales, biases, _ = quantizer(name, t, bits)
                    module = hf_name.removesuffix(".weight")
                    writer.add(hf_name, packed)
                    writer.add(module + ".scales", scales)
                    writer.add(module + ".biases", biases)
                    if bits != options.bits:
                        layers[module] = {"bits": bits}  # as mlx-lm records its predicate's answer
                ckpt.release(name)
            writer.close({"format": "mlx"})
        finally:
            writer.abort()
        dtype_name = str(dtype).removeprefix("torch.")
        cfg = hf.config(spec) | {"dtype": dtype_name, "torch_dtype": dtype_name,
                                 LAYOUT_KEY: "mlx", "rwkv_convert_source": ckpt.path.name}
        if options.quant != "none":
            quantization = {"group_size": options.group_size, "bits": options.bits, "mode": "affine"}
            cfg |= {"quantization": quantization | layers, "quantization_config": quantization | layers}
        write_json(tmp / "config.json", cfg)
        write_json(tmp / "generation_config.json", generation_config(cfg))
        write_tokenizer_code(tmp)
        write_tokenizer_files(tmp, spec, Path(options.tokenizer) if options.tokenizer else None)
    return sorted(output.iterdir())


def needs(spec: ModelSpec, options: MlxOptions) -> str | None:
    return hf.needs(spec, options)


# ---- reading ----------------------------------------------------------------------------------------
def _config(path: Path) -> dict:
    return hf.read_json(path / "config.json")


def sniff(probe: Probe) -> bool:
    path = probe.path
    if not (path.is_dir() and (path / "config.json").is_file()):
        return False
    try:
        cfg = _config(path)
    except RwkvConvertError:
        return False
    # ours say so; mlx_lm.convert's quantized RWKV-7 directories are told by their quantization entry
    return cfg.get(LAYOUT_KEY) == "mlx" or (cfg.get("model_type") == "rwkv7" and isinstance(cfg.get("quantization"),
                                                                                              dict))


class _Groups(Mapping):
    """The directory's tensors under our names, a quantized layer dequantized (to fp32) each time it is read, so
    memory stays that of one tensor; shapes and dtypes are known without reading. stored(): the file's bytes."""

    def __init__(self, path: Path, cfg: dict, tensors: dict[str, torch.Tensor]):
        quantization = cfg.get("quantization") or {}
        plain = [n for n in tensors if not n.endswith((".scales", ".biases"))]
        self._tensors, self._entries, self._bits = tensors, {}, {}
        for theirs, (ours, kind) in hf.our_names(path, cfg, plain).items():
            self._entries[ours] = (theirs, kind)
            module = theirs.removesuffix(".weight")
            if theirs.endswith(".weight") and f"{module}.scales" in tensors:
                layer = quantization.get(module, quantization)
                bits = layer.get("bits") if isinstance(layer, dict) else None
                if bits not in mlx_groups.BITS or f"{module}.biases" not in tensors:
                    raise RwkvConvertError(f"{path}: {module} is quantized, but config.json gives no valid bits for it"
                                           f" ({bits!r}) or its biases are missing")
                self._bits[ours] = bits
        self.shapes = {ours: tuple(self._shape(ours)) for ours in self._entries}
        self.dtypes = {ours: "float32" if ours in self._bits else str(tensors[theirs].dtype).removeprefix("torch.")
                       for ours, (theirs, _) in self._entries.items()}

    def _shape(self, ours: str) -> torch.Size:
        theirs, kind = self._entries[ours]
        t = self._tensors[theirs]
        if ours in self._bits:
            t = torch.empty(t.shape[0], t.shape[1] * 32 // self._bits[ours], device="meta")
        return hf.to_ours(t.reshape(-1) if _per_head(theirs) else t, kind).shape

    def stored(self, ours: str) -> torch.Tensor:
        return self._tensors[self._entries[ours][0]]

    def __getitem__(self, ours: str) -> torch.Tensor:
        theirs, kind = self._entries[ours]
        t = self._tensors[theirs]
        if ours in self._bits:
            module = theirs.removesuffix(".weight")
            t = mlx_groups.dequantize(t, self._tensors[f"{module}.scales"], self._tensors[f"{module}.biases"],
                                      self._bits[ours])
        return hf.to_ours(t.reshape(-1) if _per_head(theirs) else t, kind)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


def read(probe: Probe) -> Checkpoint:
    """Our names back, the quantized layers dequantized to fp32 as they are read (the values mlx-lm holds)."""
    path = probe.path
    cfg = _config(path)
    if not (path / WEIGHTS).is_file():
        raise RwkvConvertError(f"{path} has no {WEIGHTS}")
    return checkpoint_from_tensors(path, _Groups(path, cfg, read_safetensors(path / WEIGHTS)[0]), mmapped=True)


def stored(path: Path) -> set[str]:
    """The bounds of what the directory stores (verify's tolerance): its float type and its groups' bits."""
    cfg = _config(path)
    found = {float_bound(str(cfg.get("dtype") or "float32"))}
    quantization = cfg.get("quantization") or {}
    bits = {quantization.get("bits")} | {v.get("bits") for v in quantization.values() if isinstance(v, dict)}
    return found | {by_mlx(f"q{b}").bound for b in bits if b is not None and f"q{b}" in mlx_quants()}


def client_run(path: Path, strategy: str | None, streams: dict[str, list[int]], split: int,
               spec: ModelSpec) -> ClientRun:
    """Runs the directory in mlx-lm (MLX on this machine's CPU, or Metal on a Mac)."""
    if strategy:
        raise RwkvConvertError("an MLX directory runs in mlx-lm as it is: drop --strategy (or use --runner ours)")
    MLX_LM.check_installed()
    read(Probe(path))  # our checks first (checksums, names, shapes): mlx-lm would run altered data as it is
    session = MlxSession(path)
    outputs = {name: verify_modes(session, tokens, split) for name, tokens in streams.items()}
    cfg = _config(path)
    label = cfg.get("dtype", "float32") + (f", {cfg['quantization']['bits']}-bit groups of"
                                           f" {cfg['quantization']['group_size']}" if cfg.get("quantization") else "")
    return ClientRun(MLX_LM.name, label, outputs, stored(path))


FORMAT = Format(
    name="mlx", summary="an mlx-lm model directory (MLX)", runtime="mlx-lm (MLX on Apple Silicon, LM Studio)",
    sniff=sniff, read=read, write=write, options=MlxOptions, supports=supports, needs=needs, client_run=client_run,
    stored=stored)
