"""Hugging Face model directories: RWKV-4 as transformers' `RwkvForCausalLM` (model_type "rwkv") and RWKV-7
in the fla-hub layout that the `rwkv7-hf` package and fla load (model_type "rwkv7"). transformers has no
class for v5/v6 and fla's v6 needs Triton (no CPU): those are refused. Name maps follow
../shared/reference/onnx-and-safetensors.md; both directions are here so that `load()` reads these
directories back."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ..atomic import AtomicOutput
from ..checkpoint import Checkpoint, checkpoint_from_tensors
from ..errors import RwkvConvertError
from ..spec import ModelSpec
from ..tokenizer import world_vocab_path
from .base import Format, Options, Probe, option
from .safetensors_io import SafetensorsWriter, read_safetensors

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
V4_ATT = {"time_mix_k": "time_mix_key", "time_mix_v": "time_mix_value", "time_mix_r": "time_mix_receptance"}
V4_FFN = {"time_mix_k": "time_mix_key", "time_mix_r": "time_mix_receptance"}
V7_PROJ = {"receptance": "r_proj", "key": "k_proj", "value": "v_proj", "output": "o_proj", "ln_x": "g_norm"}
V7_NORMS = {"ln0": "pre_norm", "ln1": "attn_norm", "ln2": "ffn_norm"}
V7_LORA = {"0": "lora.2.bias", "1": "lora.0.weight", "2": "lora.2.weight"}
# the same tables read backwards (HF -> BlinkDL)
V4_ATT_BACK, V4_FFN_BACK = ({v: k for k, v in t.items()} for t in (V4_ATT, V4_FFN))
V7_PROJ_BACK, V7_NORMS_BACK, V7_LORA_BACK = ({v: k for k, v in t.items()} for t in (V7_PROJ, V7_NORMS, V7_LORA))


def supports(spec: ModelSpec) -> str | None:
    if spec.major not in (4, 7):
        return (f"no Hugging Face class runs RWKV-{spec.version} on CPU (transformers has RWKV-4 only, fla's"
                " RWKV-5/6 need Triton); use --layout web-rwkv or prepared, --to onnx, or --to gguf (v5.2, v6)")
    if spec.deep_embed:
        return "this is an RWKV-7 DeepEmbed model: the fla-hub layout has no place for ffn.s_emb"
    return None


# ---- BlinkDL -> HF ----------------------------------------------------------------------------------
def hf_tensor(name: str, t: torch.Tensor, spec) -> tuple[str, torch.Tensor] | None:
    """(HF name, tensor in the HF template's shape), or None for a tensor the HF model does not have."""
    if spec.major == 4:
        return _v4_name(name), t
    return _v7_tensor(name, t, spec)


def _v4_name(name: str) -> str:
    if name == "head.weight":
        return name
    if name == "emb.weight":
        return "rwkv.embeddings.weight"
    if name.startswith("ln_out."):
        return "rwkv." + name
    parts = name.split(".")  # blocks.N.(ln0|ln1|ln2|att|ffn).rest
    if parts[2] == "ln0":
        parts[2] = "pre_ln"
    elif parts[2] in ("att", "ffn"):
        table = V4_ATT if parts[2] == "att" else V4_FFN
        parts[3] = table.get(parts[3], parts[3])
        parts[2] = "attention" if parts[2] == "att" else "feed_forward"
    return "rwkv." + ".".join(parts)


def _v7_tensor(name: str, t: torch.Tensor, spec) -> tuple[str, torch.Tensor] | None:
    top = {"emb.weight": "model.embeddings.weight", "ln_out.weight": "model.norm.weight",
           "ln_out.bias": "model.norm.bias", "head.weight": "lm_head.weight"}
    if name in top:
        return top[name], t
    parts = name.split(".")
    layer, group, rest = int(parts[1]), parts[2], parts[3:]
    if layer == 0 and group == "att" and rest[0] in ("v0", "v1", "v2"):
        return None  # layer 0 defines v_first: its value-residual LoRA is never used
    prefix = f"model.layers.{layer}."
    if group in V7_NORMS:
        return prefix + V7_NORMS[group] + "." + ".".join(rest), t
    if group == "ffn":
        return prefix + "ffn." + ".".join(rest), (t.reshape(-1) if rest[0] == "x_k" else t)
    m = re.fullmatch(r"([wavg])([012])", rest[0])
    if m:
        kind, idx = m.groups()
        t = t.reshape(-1) if idx == "0" else t.t()
        return prefix + f"attn.{kind}_lora.{V7_LORA[idx]}", t
    if rest[0] in V7_PROJ:
        return prefix + "attn." + V7_PROJ[rest[0]] + "." + ".".join(rest[1:]), t
    if rest[0] in ("k_k", "k_a"):
        t = t.reshape(-1)
    return prefix + "attn." + ".".join(rest), t


def config(spec) -> dict:
    if spec.major == 4:
        return {"architectures": ["RwkvForCausalLM"], "model_type": "rwkv", "vocab_size": spec.vocab_size,
                "context_length": 1024, "hidden_size": spec.n_embd, "num_hidden_layers": spec.n_layer,
                "attention_hidden_size": spec.att_dim, "intermediate_size": spec.ffn_dim,
                "layer_norm_epsilon": 1e-5, "rescale_every": 6, "bos_token_id": 0, "eos_token_id": 0,
                "tie_word_embeddings": False, "use_cache": True}
    r = spec.lora_ranks
    return {"architectures": ["RWKV7ForCausalLM"], "model_type": "rwkv7", "vocab_size": spec.vocab_size,
            "hidden_size": spec.n_embd, "num_hidden_layers": spec.n_layer, "num_heads": spec.n_head,
            "head_dim": spec.head_size, "attention_hidden_size": spec.att_dim, "intermediate_size": spec.ffn_dim,
            "hidden_ratio": spec.ffn_dim / spec.n_embd, "decay_low_rank_dim": r["w"], "a_low_rank_dim": r["a"],
            "v_low_rank_dim": r.get("v", 32), "gate_low_rank_dim": r["g"], "value_dim": [spec.att_dim] * spec.n_layer,
            "norm_eps": 1e-5, "norm_bias": True, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 0,
            "tie_word_embeddings": False, "use_cache": True}


def write_tokenizer_files(directory: Path, spec, tokenizer_json: Path | None) -> None:
    """v7: the World vocabulary with rwkv7-hf's RWKV7Tokenizer; v4: a given tokenizer.json (e.g. GPT-NeoX's
    for Pile models), else the World vocabulary file alone."""
    if tokenizer_json is not None:
        shutil.copyfile(tokenizer_json, directory / "tokenizer.json")
        return
    shutil.copyfile(world_vocab_path(), directory / "rwkv_vocab_v20230424.txt")
    if spec.major == 7:
        tok = {"tokenizer_class": "RWKV7Tokenizer", "model_vocab_size": spec.vocab_size,
               "pad_token": "<|padding|>", "eos_token": "<|endoftext|>", "errors": "replace"}
        (directory / "tokenizer_config.json").write_text(json.dumps(tok, indent=2) + "\n")


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEFAULT_SHARD = "5GB"


def parse_size(text: str | int) -> int:
    """500MB, 2GB, 1.5G, 1000 -> bytes (decimal units, as Hugging Face's max_shard_size)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B?)\s*", str(text).upper())
    if not m:
        raise RwkvConvertError(f"--shard-size {text!r} is not a size like 500MB or 2GB")
    unit = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "M": 1e6, "MB": 1e6, "G": 1e9, "GB": 1e9}[m.group(2)]
    return int(float(m.group(1)) * unit)


@dataclass(frozen=True)
class HfOptions(Options):
    dtype: str | None = option(None, "the tensors' type (default: the source's)", choices=tuple(DTYPES))
    shard_size: str | int = option(DEFAULT_SHARD, "largest shard (e.g. 500MB, 2GB); bigger models get an index")
    tokenizer: str | None = option(None, "a tokenizer.json to ship (v4 Pile models); default the World vocabulary")

    def __post_init__(self) -> None:
        super().__post_init__()
        parse_size(self.shard_size)


def write(ckpt: Checkpoint, output: Path, options: HfOptions) -> list[Path]:
    spec, shard_size = ckpt.spec, parse_size(options.shard_size)
    dtype = options.dtype
    if dtype is None:  # the file's own (most common) float type
        dtype = max(DTYPES, key=lambda d: spec.dtypes.get(str(DTYPES[d]).removeprefix("torch."), 0))
    target = DTYPES[dtype]
    jobs = []
    for name, t in ckpt.tensors.items():
        mapped = hf_tensor(name, t, spec)
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
    with AtomicOutput(output, directory=True) as out:
        tmp = out.temp()
        names = [WEIGHTS_NAME] if len(shards) == 1 else \
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
            finally:
                writer.abort()
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        cfg = config(spec) | {"torch_dtype": str(target).removeprefix("torch."), "rwkv_convert_source": ckpt.path.name}
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        write_tokenizer_files(tmp, spec, Path(options.tokenizer) if options.tokenizer else None)
    return sorted(output.iterdir())


# ---- HF -> BlinkDL ----------------------------------------------------------------------------------
def is_hf_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def read_hf_dir(path: Path) -> dict[str, torch.Tensor]:
    """BlinkDL-named tensors (mmap views) from a directory this module wrote, or one like it."""
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise RwkvConvertError(f"{path}/config.json is not readable JSON: {e}") from None
    model_type = cfg.get("model_type")
    if model_type not in ("rwkv", "rwkv7"):
        raise RwkvConvertError(f"{path} holds a {model_type!r} model; rwkv-convert reads model_type rwkv (v4) and"
                               " rwkv7 directories")
    if (path / INDEX_NAME).is_file():
        index = json.loads((path / INDEX_NAME).read_text())
        files = sorted(set(index.get("weight_map", {}).values()))
    elif (path / WEIGHTS_NAME).is_file():
        files = [WEIGHTS_NAME]
    else:
        raise RwkvConvertError(f"{path} has no {WEIGHTS_NAME} (or {INDEX_NAME}); pytorch_model.bin is not read")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        if "/" in name or name.startswith("."):
            raise RwkvConvertError(f"{path}/{INDEX_NAME} names a shard outside the directory: {name!r}")
        tensors.update(read_safetensors(path / name)[0])
    to_blinkdl = _from_v4 if model_type == "rwkv" else _from_v7
    return dict(to_blinkdl(k, v, cfg) for k, v in tensors.items())


def _from_v4(name: str, t: torch.Tensor, cfg) -> tuple[str, torch.Tensor]:
    if name == "head.weight":
        return name, t
    name = name.removeprefix("rwkv.")
    if name == "embeddings.weight":
        return "emb.weight", t
    if name.startswith("ln_out."):
        return name, t
    parts = name.split(".")
    if parts[2] == "pre_ln":
        parts[2] = "ln0"
    elif parts[2] in ("attention", "feed_forward"):
        table = V4_ATT_BACK if parts[2] == "attention" else V4_FFN_BACK
        parts[3] = table.get(parts[3], parts[3])
        parts[2] = "att" if parts[2] == "attention" else "ffn"
    return ".".join(parts), t


def _from_v7(name: str, t: torch.Tensor, cfg) -> tuple[str, torch.Tensor]:
    top = {"model.embeddings.weight": "emb.weight", "model.norm.weight": "ln_out.weight",
           "model.norm.bias": "ln_out.bias", "lm_head.weight": "head.weight"}
    if name in top:
        return top[name], t
    parts = name.split(".")  # model.layers.N.group.rest
    layer, group, rest = parts[2], parts[3], parts[4:]
    prefix = f"blocks.{layer}."
    if group in V7_NORMS_BACK:
        return prefix + V7_NORMS_BACK[group] + "." + ".".join(rest), t
    if group == "ffn":
        return prefix + "ffn." + ".".join(rest), (t.reshape(1, 1, -1) if rest[0] == "x_k" else t)
    m = re.fullmatch(r"([wavg])_lora", rest[0])
    if m:
        idx = V7_LORA_BACK[".".join(rest[1:])]
        return prefix + f"att.{m.group(1)}{idx}", (t.reshape(1, 1, -1) if idx == "0" else t.t())
    if rest[0] in V7_PROJ_BACK:
        return prefix + "att." + V7_PROJ_BACK[rest[0]] + "." + ".".join(rest[1:]), t
    if rest[0] in ("k_k", "k_a"):
        t = t.reshape(1, 1, -1)
    return prefix + "att." + ".".join(rest), t


def read(probe: Probe) -> Checkpoint:
    return checkpoint_from_tensors(probe.path, read_hf_dir(probe.path), mmapped=True)


FORMAT = Format(
    name="hf", family="safetensors", summary="a Hugging Face model directory",
    runtime="transformers (RWKV-4) and rwkv7-hf / fla (RWKV-7)", sniff=lambda probe: is_hf_dir(probe.path),
    read=read, write=write, options=HfOptions, supports=supports)
