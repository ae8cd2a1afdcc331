"""Hugging Face model directories: RWKV-4 as transformers' `RwkvForCausalLM` (model_type "rwkv") and RWKV-7
in the fla-hub layout that the `rwkv7-hf` package and fla load (model_type "rwkv7"). transformers has no
class for v5/v6 and fla's v6 needs Triton (no CPU): those are refused. Name maps follow
../shared/reference/onnx-and-safetensors.md; both directions are here so that `load()` reads these
directories back."""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from ..arch import module_for
from ..atomic import AtomicOutput
from ..checkpoint import Checkpoint, checkpoint_from_tensors
from ..errors import CastWarning, RwkvConvertError, brief
from ..runtimes.base import ClientRun, verify_modes
from ..runtimes.hf_transformers import (
    AUTO_MAP,
    INDEX_NAME,
    TRUST_OPTION,
    WEIGHTS_NAME,
    TransformersSession,
    runs_in_transformers,
    stored_scheme,
)
from ..runtimes.hf_transformers import CLIENT as TRANSFORMERS
from ..spec import ModelSpec
from ..tokenizer import (
    HFTokenizer,
    check_fits,
    vocabulary_too_small,
)
from ..units import parse_size
from .base import Format, Options, Probe, option, per_token_tables_refusal
from .gguf_tables import rwkv6_lora_ranks
from .hf_files import (
    WORLD_VOCAB,
    generation_config,
    rwkv7_hf_folder,
    write_json,
    write_model_code,
    write_tokenizer_files,
)
from .safetensors_io import SafetensorsWriter, read_safetensors


@dataclass(frozen=True)
class Name:
    """One tensor in both namings. {i}: the layer. kind: "same"; "vector" (their [C] for our [1, 1, C]); "t"
    (transposed: their LoRAs are nn.Linear [out, in], ours x @ W [in, out])."""
    ours: str
    theirs: str
    kind: str = "same"
    skip_layer0: bool = False  # layer 0's value-residual LoRA: never used there, and not in the HF model


def _layer(rows: list[tuple], **kw) -> tuple[Name, ...]:
    return tuple(Name(f"blocks.{{i}}.{ours}", theirs, *rest, **kw) for ours, theirs, *rest in rows)


# the "rwkv." naming transformers' RWKV-4 and the RWKV-6 hub models share
_RWKV_SHARED = (
    Name("emb.weight", "rwkv.embeddings.weight"),
    Name("blocks.0.ln0.weight", "rwkv.blocks.0.pre_ln.weight"), Name("blocks.0.ln0.bias", "rwkv.blocks.0.pre_ln.bias"),
    Name("ln_out.weight", "rwkv.ln_out.weight"), Name("ln_out.bias", "rwkv.ln_out.bias"),
    Name("head.weight", "head.weight"),
) + _layer([(f"{n}.{p}", f"rwkv.blocks.{{i}}.{n}.{p}") for n in ("ln1", "ln2") for p in ("weight", "bias")])

# transformers' RwkvForCausalLM (model_type "rwkv")
V4_NAMES = _RWKV_SHARED + _layer(
    [(f"att.time_mix_{k}", f"rwkv.blocks.{{i}}.attention.time_mix_{hf}")
       for k, hf in (("k", "key"), ("v", "value"), ("r", "receptance"))]
    + [(f"att.{n}", f"rwkv.blocks.{{i}}.attention.{n}") for n in ("time_decay", "time_first", "key.weight",
                                                                  "value.weight", "receptance.weight",
                                                                  "output.weight")]
    + [(f"ffn.time_mix_{k}", f"rwkv.blocks.{{i}}.feed_forward.time_mix_{hf}")
       for k, hf in (("k", "key"), ("r", "receptance"))]
    + [(f"ffn.{n}.weight", f"rwkv.blocks.{{i}}.feed_forward.{n}.weight")
       for n in ("key", "value", "receptance")])

# the fla-hub layout (model_type "rwkv7"): rwkv7-hf and fla
_V7_LAYER = "model.layers.{i}."
V7_NAMES = (
    Name("emb.weight", "model.embeddings.weight"),
    Name("blocks.0.ln0.weight", "model.layers.0.pre_norm.weight"),
    Name("blocks.0.ln0.bias", "model.layers.0.pre_norm.bias"),
    Name("ln_out.weight", "model.norm.weight"), Name("ln_out.bias", "model.norm.bias"),
    Name("head.weight", "lm_head.weight"),
) + _layer([(f"{n}.{p}", f"{_V7_LAYER}{hf}.{p}") for n, hf in (("ln1", "attn_norm"), ("ln2", "ffn_norm"))
            for p in ("weight", "bias")]
           + [(f"att.x_{n}", f"{_V7_LAYER}attn.x_{n}") for n in "rwkvag"]
           + [(f"att.{n}", f"{_V7_LAYER}attn.{n}", "vector") for n in ("k_k", "k_a")]
           + [("att.r_k", f"{_V7_LAYER}attn.r_k")]
           + [(f"att.{n}.weight", f"{_V7_LAYER}attn.{hf}.weight")
              for n, hf in (("receptance", "r_proj"), ("key", "k_proj"), ("value", "v_proj"), ("output", "o_proj"))]
           + [(f"att.ln_x.{p}", f"{_V7_LAYER}attn.g_norm.{p}") for p in ("weight", "bias")]
           + [(f"att.{x}{k}", f"{_V7_LAYER}attn.{x}_lora.{hf}", kind) for x in "wag"
              for k, hf, kind in (("0", "lora.2.bias", "vector"), ("1", "lora.0.weight", "t"),
                                  ("2", "lora.2.weight", "t")) if (x, k) != ("g", "0")]
           + [("ffn.x_k", f"{_V7_LAYER}ffn.x_k", "vector")]
           + [(f"ffn.{n}.weight", f"{_V7_LAYER}ffn.{n}.weight") for n in ("key", "value")]) + _layer(
    [(f"att.v{k}", f"{_V7_LAYER}attn.v_lora.{hf}", kind)
     for k, hf, kind in (("0", "lora.2.bias", "vector"), ("1", "lora.0.weight", "t"), ("2", "lora.2.weight", "t"))],
    skip_layer0=True)
# RWKV/v6-Finch-*-HF (model_type "rwkv6", Rwkv6ForCausalLM): BlinkDL's tensors and shapes under HF names, the
# layout llama.cpp's convert_hf_to_gguf.py reads
V6_NAMES = _RWKV_SHARED + _layer(
    [(f"att.{n}", f"rwkv.blocks.{{i}}.attention.{n}")
       for n in [f"time_maa_{x}" for x in ("x", "w", "k", "v", "r", "g", "w1", "w2")]
       + ["time_decay", "time_decay_w1", "time_decay_w2", "time_faaaa", "ln_x.weight", "ln_x.bias"]
       + [f"{m}.weight" for m in ("receptance", "key", "value", "gate", "output")]]
    + [(f"ffn.{n}", f"rwkv.blocks.{{i}}.feed_forward.{n}")
       for n in ("time_maa_k", "time_maa_r", "key.weight", "receptance.weight", "value.weight")])
NAME_TABLES = {"rwkv": V4_NAMES, "rwkv6": V6_NAMES, "rwkv7": V7_NAMES}  # by HF model_type


@lru_cache(maxsize=16)
def name_map(model_type: str, n_layer: int, forward: bool) -> dict[str, tuple[str, str]]:
    """{our name: (their name, kind)} (forward) or {their name: (our name, kind)}, for every layer."""
    out = {}
    for row in NAME_TABLES[model_type]:
        layers = range(n_layer) if "{i}" in row.ours else [0]
        for i in layers:
            if row.skip_layer0 and i == 0:
                continue
            ours, theirs = row.ours.format(i=i), row.theirs.format(i=i)
            out.update({ours: (theirs, row.kind)} if forward else {theirs: (ours, row.kind)})
    return out


def _to_theirs(t: torch.Tensor, kind: str) -> torch.Tensor:
    return t.reshape(-1) if kind == "vector" else t.t() if kind == "t" else t


def to_ours(t: torch.Tensor, kind: str) -> torch.Tensor:
    return t.reshape(1, 1, -1) if kind == "vector" else t.t() if kind == "t" else t


def model_type(spec: ModelSpec) -> str | None:
    return module_for(spec.version).HF_MODEL_TYPE.get(spec.version)


def supports(spec: ModelSpec) -> str | None:
    if model_type(spec) is None:
        return (f"RWKV-{spec.version} has no Hugging Face layout (there are RWKV-4, 5.2 and 6 as Rwkv6ForCausalLM,"
                " and 7); use --to web-rwkv, --to prepared or --to onnx")
    if spec.time_state:
        return ("this is a state-tuned model (att.time_state): no Hugging Face layout has a place for its learned"
                " initial state; use --to web-rwkv, --to prepared, --to onnx or --to pip, which keep it")
    if spec.deep_embed or spec.dea:
        return per_token_tables_refusal(spec, "the fla-hub layout (transformers)")
    return None


# ---- BlinkDL -> HF ----------------------------------------------------------------------------------
def hf_tensor(name: str, t: torch.Tensor, spec) -> tuple[str, torch.Tensor] | None:
    """(HF name, tensor in the HF template's shape), or None for a tensor the HF model does not have."""
    found = name_map(model_type(spec), spec.n_layer, True).get(name)
    return None if found is None else (found[0], _to_theirs(t, found[1]))


def source_tensors(ckpt: Checkpoint):
    """(source name to release after, our name, tensor) in the naming of the HF layout's version: the
    checkpoint's own, or for RWKV-5.2 the RWKV-6 model that computes the same (see _v52_as_v6)."""
    if ckpt.spec.version != "5.2":
        return ((name, name, t) for name, t in ckpt.tensors.items())
    return _v52_as_v6(ckpt)


def _note_converter_ranks(spec: ModelSpec) -> None:
    if spec.version != "6":
        return
    ranks, expected = (spec.lora_ranks["maa"], spec.lora_ranks["decay"]), rwkv6_lora_ranks(spec.n_embd)
    if ranks != expected:
        warnings.warn(f"this model's LoRA ranks are {ranks[0]}/{ranks[1]}; llama.cpp's convert_hf_to_gguf.py assumes"
                      f" {expected[0]}/{expected[1]} at this width and writes a GGUF that llama.cpp will not load:"
                      " for llama.cpp use --to gguf", CastWarning, stacklevel=2)


def _v52_as_v6(ckpt: Checkpoint):
    """RWKV-5.2 as RWKV-6 with both LoRAs at zero: the token-shift LoRA adds 0 to each static mix, the decay
    LoRA 0 to time_decay, so w = exp(-exp(time_decay)) as in 5.2; v5's lerp x*mix + sx*(1-mix) is v6's
    x + (sx-x)*maa with maa = 1 - mix (the same as the GGUF export's rwkv6-from-5.2 table)."""
    spec = ckpt.spec
    C = spec.n_embd
    rank, decay_rank = rwkv6_lora_ranks(C)
    for name, t in ckpt.tensors.items():
        kind = name.rsplit(".", 1)[-1]
        if kind.startswith("time_mix_"):  # att.time_mix_{k,v,r,g}, ffn.time_mix_{k,r}
            yield name, name.replace("time_mix_", "time_maa_"), 1 - t.float()
        elif name.endswith("att.time_decay"):  # per channel [H, N] -> v6's [1, 1, C]
            yield name, name, t.reshape(1, 1, -1)
        else:
            yield name, name, t
        if name.endswith(".att.key.weight"):  # once per layer: what v6 has and 5.2 does not
            layer = name[: -len("key.weight")]
            for extra, shape in (("time_maa_x", (1, 1, C)), ("time_maa_w", (1, 1, C)), ("time_maa_w1", (C, 5 * rank)),
                                 ("time_maa_w2", (5, rank, C)), ("time_decay_w1", (C, decay_rank)),
                                 ("time_decay_w2", (decay_rank, spec.att_dim))):
                yield None, layer + extra, torch.zeros(shape)


def config(spec) -> dict:
    if model_type(spec) == "rwkv6":  # as RWKV/v6-Finch-*-HF; what llama.cpp's converter reads
        return {"architectures": ["Rwkv6ForCausalLM"], "model_type": "rwkv6", "vocab_size": spec.vocab_size,
                "hidden_size": spec.n_embd, "num_hidden_layers": spec.n_layer, "attention_hidden_size": spec.att_dim,
                "head_size": spec.head_size, "head_size_divisor": 8, "num_attention_heads": spec.n_head,
                "intermediate_size": spec.ffn_dim, "layer_norm_epsilon": 1e-5, "rescale_every": 6,
                "bos_token_id": 0, "eos_token_id": 0, "tie_word_embeddings": False, "use_cache": True}
    if model_type(spec) == "rwkv":
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
            "tie_word_embeddings": False, "use_cache": True, "num_attention_heads": spec.n_head,
            "attn_mode": "chunk", "fuse_norm": False, "initializer_range": 0.02}  # the last: as rwkv7-hf writes


def needs(spec: ModelSpec, options: HfOptions) -> str | None:
    """What a model needs of the options: the tokenizer it was trained with (checked against its vocabulary
    before anything is written)."""

    if options.tokenizer is not None:
        note = check_fits(HFTokenizer(options.tokenizer), spec.vocab_size)  # refuses more ids than the model has
        if note:
            warnings.warn(note, CastWarning, stacklevel=2)
        return None
    too_small = vocabulary_too_small(spec.vocab_size)  # no tokenizer of ours fits: the user's must come with it
    if too_small:
        return too_small
    if spec.vocab_size != WORLD_VOCAB and model_type(spec) == "rwkv":
        return (f"this RWKV-4 model has {spec.vocab_size} token ids, not the World vocabulary's {WORLD_VOCAB}: pass"
                " the tokenizer it was trained with, --tokenizer tokenizer.json (the Pile models: GPT-NeoX's 20B"
                " tokenizer)")
    return None


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def source_dtype(spec: ModelSpec) -> str:
    """The checkpoint's own (most common) float type, as a DTYPES word: what a --dtype left out writes."""
    return max(DTYPES, key=lambda d: spec.dtypes.get(str(DTYPES[d]).removeprefix("torch."), 0))
DEFAULT_SHARD = "5GB"


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
    target = DTYPES[options.dtype or source_dtype(spec)]
    _note_converter_ranks(spec)
    if model_type(spec) == "rwkv7" or options.tokenizer is None:
        rwkv7_hf_folder()  # its model or tokenizer code is copied: found before any weight is written
    jobs = []
    for name, ours, t in source_tensors(ckpt):
        mapped = hf_tensor(ours, t, spec)
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
                    if src_name is not None:
                        ckpt.release(src_name)
                writer.close({"format": "pt"})
            finally:
                writer.abort()
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        cfg = config(spec) | {"dtype": str(target).removeprefix("torch."), "rwkv_convert_source": ckpt.path.name}
        if model_type(spec) == "rwkv7":
            write_model_code(tmp)
            cfg |= {"auto_map": AUTO_MAP, "rwkv7_hf_adapter_layout": "reference"}
        write_json(tmp / "config.json", cfg)
        write_json(tmp / "generation_config.json", generation_config(cfg))
        write_tokenizer_files(tmp, spec, Path(options.tokenizer) if options.tokenizer else None)
    return sorted(output.iterdir())


# ---- HF -> BlinkDL ----------------------------------------------------------------------------------
def is_hf_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def read_hf_dir(path: Path) -> dict[str, torch.Tensor]:
    """BlinkDL-named tensors (mmap views) from a directory this module wrote, or one like it."""
    cfg = read_json(path / "config.json")
    known_model_type(path, cfg)
    if (path / INDEX_NAME).is_file():
        weight_map = read_json(path / INDEX_NAME).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise RwkvConvertError(f"{path}/{INDEX_NAME} has no weight_map of tensor names to files")
        files = sorted(set(weight_map.values()))
    elif (path / WEIGHTS_NAME).is_file():
        files = [WEIGHTS_NAME]
    else:
        raise RwkvConvertError(f"{path} has no {WEIGHTS_NAME} (or {INDEX_NAME}); pytorch_model.bin is not read")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        if "/" in name or name.startswith("."):
            raise RwkvConvertError(f"{path}/{INDEX_NAME} names a shard outside the directory: {name!r}")
        tensors.update(read_safetensors(path / name)[0])
    return tensors_from_hf(path, cfg, tensors)


def tensors_from_hf(path: Path, cfg: dict, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our names and shapes of an HF-named directory's tensors, its layer count checked."""
    return {ours: to_ours(tensors[theirs], kind) for theirs, (ours, kind) in our_names(path, cfg, tensors).items()}


def our_names(path: Path, cfg: dict, names) -> dict[str, tuple[str, str]]:
    """{their name: (our name, kind)} for the tensors an HF-named directory (hf, mlx) holds, its layer count
    checked; a tensor we do not know keeps its name (inspect lists it as unused)."""
    hf_type = known_model_type(path, cfg)
    n_layer = cfg.get("num_hidden_layers")
    if not isinstance(n_layer, int) or n_layer < 1:
        raise RwkvConvertError(f"{path}/config.json has no valid num_hidden_layers ({n_layer!r})")
    known = name_map(hf_type, n_layer, False)
    held = {int(m.group(1)) for name in names if (m := re.search(r"\.(\d+)\.", name))}
    if held and max(held) + 1 != n_layer:  # else a smaller count would drop layers without a word
        raise RwkvConvertError(f"{path}/config.json says num_hidden_layers {n_layer} but the weights hold"
                               f" {max(held) + 1} layers; the directory is damaged or mixed")
    return {name: known.get(name, (name, "same")) for name in names}


def known_model_type(path: Path, cfg: dict) -> str:
    hf_type = cfg.get("model_type")
    if hf_type not in NAME_TABLES:
        raise RwkvConvertError(f"{path} holds a {hf_type!r} model; rwkv-convert reads model_type rwkv (v4) and"
                               " rwkv7 directories")
    return hf_type


def read_json(path: Path) -> dict:
    try:
        found = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RwkvConvertError(f"{path} is not readable JSON: {brief(e)}") from None
    if not isinstance(found, dict):
        raise RwkvConvertError(f"{path} holds a JSON {type(found).__name__}, not an object")
    return found


def read(probe: Probe) -> Checkpoint:
    return checkpoint_from_tensors(probe.path, read_hf_dir(probe.path), mmapped=True)


def client_run(path: Path, strategy: str | None, streams: dict[str, list[int]], split: int,
           spec: ModelSpec) -> ClientRun | None:
    """RWKV-4 and RWKV-7 directories in transformers, loaded as their users load them; None for v5.2/v6 ones
    (their client is llama.cpp's converter, not a Python runtime: our reader runs them)."""
    if not runs_in_transformers(path):
        return None
    if strategy:
        raise RwkvConvertError("an HF directory runs in transformers as it is: drop --strategy (or use --runner ours)")
    TRANSFORMERS.check_installed()
    session = TransformersSession(path)
    outputs = {name: verify_modes(session, tokens, split) for name, tokens in streams.items()}
    trusted = f", the directory's own code run by {TRUST_OPTION}" if session.trusted else ""
    return ClientRun(f"transformers ({type(session.model).__name__}{trusted})", "cpu fp32", outputs,
                     {"fp32", stored_scheme(path)})


FORMAT = Format(
    name="hf", family="safetensors", summary="a Hugging Face model directory",
    runtime="transformers (RWKV-4) and rwkv7-hf / fla (RWKV-7)", sniff=lambda probe: is_hf_dir(probe.path),
    read=read, write=write, options=HfOptions, supports=supports, needs=needs, client_run=client_run)
