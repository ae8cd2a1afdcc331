"""GGUF for llama.cpp (architectures `rwkv6` and `rwkv7`), written straight from BlinkDL `.pth` files.

Tensor names and shapes follow llama.cpp's loader exactly (an extra tensor fails the load); every tensor
that enters an elementwise op stays F32 (norms, 1-D parameters, lerp stacks, LoRAs); `--quant` applies to
the large matrices. Written streaming: tensor infos first (shapes and types are known from the source's
shapes), then each tensor is converted, quantized, written and released. Atomic: temp file, then rename.
See ../shared/reference/gguf.md (in the project's docs) for the facts this follows."""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..atomic import AtomicOutput
from ..checkpoint import Checkpoint, checkpoint_from_tensors
from ..errors import RwkvConvertError, UnsupportedError
from ..llama_runtime import LlamaCppRunner
from ..spec import ModelSpec
from ..strategy import Strategy, allocate, parse_strategy
from ..tokenizer import WorldTokenizer
from .base import Format, NativeRun, Options, option

QUANTS = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
ARCHS = {"5.2": "rwkv6", "6": "rwkv6", "7": "rwkv7"}
V52_LORA_RANK = 32  # v5.2 as rwkv6: zero LoRAs of this rank (llama.cpp reads the ranks from the shapes)
CONTEXT_LENGTH = 1048576  # what upstream writes; RWKV has no context limit
EOT_TOKEN = 261  # "\n\n" in the World vocabulary


def _gguf():
    try:
        import gguf
    except ImportError:
        raise RwkvConvertError("GGUF support needs the `gguf` package: pip install gguf") from None
    return gguf


@dataclass
class TensorJob:
    name: str
    shape: tuple[int, ...]  # numpy order
    quantizable: bool  # a large matrix: takes --quant (or the strategy's choice); else F32
    make: Callable[[], torch.Tensor]
    layer: int  # the strategy slot that decides its type (n_layer for globals)


def _vec(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1)


def global_jobs(ckpt: Checkpoint) -> list[TensorJob]:
    """Both architectures: the raw embedding (llama.cpp applies ln0 itself), ln0, ln_out and the head."""
    spec, T = ckpt.spec, ckpt.tensors
    L, C, V = spec.n_layer, spec.n_embd, spec.vocab_size
    return [
        TensorJob("token_embd.weight", (V, C), True, lambda: T["emb.weight"], 0),
        TensorJob("token_embd_norm.weight", (C,), False, lambda: T["blocks.0.ln0.weight"], L),
        TensorJob("token_embd_norm.bias", (C,), False, lambda: T["blocks.0.ln0.bias"], L),
        TensorJob("output_norm.weight", (C,), False, lambda: T["ln_out.weight"], L),
        TensorJob("output_norm.bias", (C,), False, lambda: T["ln_out.bias"], L),
        TensorJob("output.weight", (V, C), True, lambda: T["head.weight"], L),
    ]


def norm_jobs(ckpt: Checkpoint, i: int) -> list[TensorJob]:
    T, C = ckpt.tensors, ckpt.spec.n_embd
    return [TensorJob(f"blk.{i}.{gname}.{part}", (C,), False, lambda k=f"blocks.{i}.{src}.{part}": T[k], i)
            for gname, src in (("attn_norm", "ln1"), ("attn_norm_2", "ln2")) for part in ("weight", "bias")]


def projection_jobs(ckpt: Checkpoint, i: int, names: tuple[str, ...]) -> list[TensorJob]:
    """The attention's large matrices and its ln_x, the same in rwkv6 and rwkv7 (gate only in v6)."""
    T, C, A = ckpt.tensors, ckpt.spec.n_embd, ckpt.spec.att_dim
    b, g = f"blocks.{i}.", f"blk.{i}."
    jobs = [TensorJob(g + f"time_mix_{n}.weight", (A, C), True, lambda k=b + f"att.{n}.weight": T[k], i)
            for n in names]
    jobs += [TensorJob(g + f"time_mix_ln.{p}", (A,), False, lambda k=b + f"att.ln_x.{p}": T[k], i)
             for p in ("weight", "bias")]
    jobs.append(TensorJob(g + "time_mix_output.weight", (C, A), True, lambda k=b + "att.output.weight": T[k], i))
    return jobs


def v7_jobs(ckpt: Checkpoint) -> list[TensorJob]:
    spec, T = ckpt.spec, ckpt.tensors
    L, C = spec.n_layer, spec.n_embd
    jobs = global_jobs(ckpt)
    ranks = spec.lora_ranks
    for i in range(L):
        b, g = f"blocks.{i}.", f"blk.{i}."

        def src(name, b=b):
            return lambda: T[b + name]

        def lora_t(name, b=b):
            return lambda: T[b + name].t()

        # Layer 0 has no value residual; llama.cpp still loads v0/v1/v2 there, with the iclr rank: copies of a.
        v = "a" if i == 0 else "v"
        v_rank = ranks["a"] if i == 0 else ranks["v"]
        jobs += norm_jobs(ckpt, i) + [
            TensorJob(g + "time_mix_lerp_fused.weight", (6, 1, 1, C), False,
                      lambda b=b: torch.stack([T[b + f"att.x_{n}"].reshape(1, 1, C) for n in "rwkvag"]), i),
            TensorJob(g + "time_mix_w0.weight", (C,), False, lambda b=b: _vec(T[b + "att.w0"]), i),
            TensorJob(g + "time_mix_w1.weight", (ranks["w"], C), False, lora_t("att.w1"), i),
            TensorJob(g + "time_mix_w2.weight", (C, ranks["w"]), False, lora_t("att.w2"), i),
            TensorJob(g + "time_mix_a0.weight", (C,), False, lambda b=b: _vec(T[b + "att.a0"]), i),
            TensorJob(g + "time_mix_a1.weight", (ranks["a"], C), False, lora_t("att.a1"), i),
            TensorJob(g + "time_mix_a2.weight", (C, ranks["a"]), False, lora_t("att.a2"), i),
            TensorJob(g + "time_mix_v0.weight", (C,), False, lambda b=b, v=v: _vec(T[b + f"att.{v}0"]), i),
            TensorJob(g + "time_mix_v1.weight", (v_rank, C), False, lora_t(f"att.{v}1"), i),
            TensorJob(g + "time_mix_v2.weight", (C, v_rank), False, lora_t(f"att.{v}2"), i),
            TensorJob(g + "time_mix_g1.weight", (ranks["g"], C), False, lora_t("att.g1"), i),
            TensorJob(g + "time_mix_g2.weight", (C, ranks["g"]), False, lora_t("att.g2"), i),
            TensorJob(g + "time_mix_k_k.weight", (C,), False, lambda b=b: _vec(T[b + "att.k_k"]), i),
            TensorJob(g + "time_mix_k_a.weight", (C,), False, lambda b=b: _vec(T[b + "att.k_a"]), i),
            TensorJob(g + "time_mix_r_k.weight", (C,), False, lambda b=b: _vec(T[b + "att.r_k"]), i),
        ] + projection_jobs(ckpt, i, ("key", "value", "receptance")) + [
            TensorJob(g + "channel_mix_lerp_k.weight", (C,), False, lambda b=b: _vec(T[b + "ffn.x_k"]), i),
            TensorJob(g + "channel_mix_key.weight", (spec.ffn_dim, C), True, src("ffn.key.weight"), i),
            TensorJob(g + "channel_mix_value.weight", (C, spec.ffn_dim), True, src("ffn.value.weight"), i),
        ]
    return jobs


def v6_jobs(ckpt: Checkpoint) -> list[TensorJob]:
    spec, T = ckpt.spec, ckpt.tensors
    L, C, A, F = spec.n_layer, spec.n_embd, spec.att_dim, spec.ffn_dim
    Dm, Dd = spec.lora_ranks["maa"], spec.lora_ranks["decay"]
    jobs = global_jobs(ckpt)
    for i in range(L):
        b, g = f"blocks.{i}.", f"blk.{i}."

        def src(name, b=b):
            return lambda: T[b + name]

        jobs += norm_jobs(ckpt, i) + [
            TensorJob(g + "time_mix_lerp_x.weight", (1, 1, C), False, src("att.time_maa_x"), i),
            TensorJob(g + "time_mix_lerp_fused.weight", (5, 1, 1, C), False,
                      lambda b=b: torch.stack([T[b + f"att.time_maa_{n}"].reshape(1, 1, C) for n in "wkvrg"]), i),
            TensorJob(g + "time_mix_w1.weight", (5 * Dm, C), False, lambda b=b: T[b + "att.time_maa_w1"].t(), i),
            TensorJob(g + "time_mix_w2.weight", (5, C, Dm), False,
                      lambda b=b: T[b + "att.time_maa_w2"].permute(0, 2, 1), i),
            TensorJob(g + "time_mix_decay.weight", (A,), False, lambda b=b: _vec(T[b + "att.time_decay"]), i),
            TensorJob(g + "time_mix_decay_w1.weight", (Dd, C), False, lambda b=b: T[b + "att.time_decay_w1"].t(), i),
            TensorJob(g + "time_mix_decay_w2.weight", (A, Dd), False, lambda b=b: T[b + "att.time_decay_w2"].t(), i),
            TensorJob(g + "time_mix_first.weight", (spec.n_head, spec.head_size), False, src("att.time_faaaa"), i),
        ] + projection_jobs(ckpt, i, ("key", "value", "receptance", "gate")) + [
            TensorJob(g + "channel_mix_lerp_k.weight", (1, 1, C), False, src("ffn.time_maa_k"), i),
            TensorJob(g + "channel_mix_lerp_r.weight", (1, 1, C), False, src("ffn.time_maa_r"), i),
            TensorJob(g + "channel_mix_key.weight", (F, C), True, src("ffn.key.weight"), i),
            TensorJob(g + "channel_mix_value.weight", (C, F), True, src("ffn.value.weight"), i),
            TensorJob(g + "channel_mix_receptance.weight", (C, C), True, src("ffn.receptance.weight"), i),
        ]
    return jobs


def v52_jobs(ckpt: Checkpoint) -> list[TensorJob]:
    """RWKV-5.2 as llama.cpp's rwkv6: v6 with its two LoRAs at zero is v5.2 exactly. v6 mixes as
    x + (sx - x) * maa where v5 has x * mix + sx * (1 - mix), so maa = 1 - mix; the decay LoRA adds 0 to
    time_decay, so w = exp(-exp(time_decay)) as in v5.2; the bonus is time_faaaa; the FFN is the same."""
    spec, T = ckpt.spec, ckpt.tensors
    L, C, A, F, R = spec.n_layer, spec.n_embd, spec.att_dim, spec.ffn_dim, V52_LORA_RANK
    jobs = global_jobs(ckpt)
    for i in range(L):
        b, g = f"blocks.{i}.", f"blk.{i}."

        def rest(name, b=b):  # 1 - mix, as a v6 maa
            return lambda: 1 - T[b + name].float().reshape(1, 1, C)

        def zeros(*shape):
            return lambda: torch.zeros(shape)

        jobs += norm_jobs(ckpt, i) + [
            TensorJob(g + "time_mix_lerp_x.weight", (1, 1, C), False, zeros(1, 1, C), i),
            TensorJob(g + "time_mix_lerp_fused.weight", (5, 1, 1, C), False,  # w (unused by v5), k, v, r, g
                      lambda b=b: torch.stack([torch.zeros(1, 1, C)] + [1 - T[b + f"att.time_mix_{n}"].float()
                                                                         .reshape(1, 1, C) for n in "kvrg"]), i),
            TensorJob(g + "time_mix_w1.weight", (5 * R, C), False, zeros(5 * R, C), i),
            TensorJob(g + "time_mix_w2.weight", (5, C, R), False, zeros(5, C, R), i),
            TensorJob(g + "time_mix_decay.weight", (A,), False, lambda b=b: _vec(T[b + "att.time_decay"]), i),
            TensorJob(g + "time_mix_decay_w1.weight", (R, C), False, zeros(R, C), i),
            TensorJob(g + "time_mix_decay_w2.weight", (A, R), False, zeros(A, R), i),
            TensorJob(g + "time_mix_first.weight", (spec.n_head, spec.head_size), False,
                      lambda b=b: T[b + "att.time_faaaa"], i),
        ] + projection_jobs(ckpt, i, ("key", "value", "receptance", "gate")) + [
            TensorJob(g + "channel_mix_lerp_k.weight", (1, 1, C), False, rest("ffn.time_mix_k"), i),
            TensorJob(g + "channel_mix_lerp_r.weight", (1, 1, C), False, rest("ffn.time_mix_r"), i),
            TensorJob(g + "channel_mix_key.weight", (F, C), True, lambda b=b: T[b + "ffn.key.weight"], i),
            TensorJob(g + "channel_mix_value.weight", (C, F), True, lambda b=b: T[b + "ffn.value.weight"], i),
            TensorJob(g + "channel_mix_receptance.weight", (C, C), True, lambda b=b: T[b + "ffn.receptance.weight"],
                      i),
        ]
    return jobs


ROWS_PER_CHUNK = 1024


def _encode(gguf, pool: ThreadPoolExecutor, job: TensorJob, qtype) -> np.ndarray:
    """The tensor's bytes in the file's type. Rows are converted in chunks on all cores, into one output
    array: the fp32 copy of a large matrix never exists whole (a 65536x2048 head would be 0.5 GB)."""
    source = job.make()
    if tuple(source.shape) != job.shape:
        raise RwkvConvertError(f"internal: {job.name} has shape {tuple(source.shape)}, expected {job.shape}")
    if qtype == gguf.GGMLQuantizationType.F32:
        return source.to(torch.float32).contiguous().numpy()
    flat = source.reshape(-1, job.shape[-1]) if source.dim() > 1 else source.reshape(1, -1)
    if qtype == gguf.GGMLQuantizationType.F16:
        out = np.empty(flat.shape, dtype=np.float16)
    else:
        out = np.empty(gguf.quant_shape_to_byte_shape(flat.shape, qtype), dtype=np.uint8)

    def encode_rows(start: int) -> None:
        rows = flat[start:start + ROWS_PER_CHUNK].to(torch.float32).numpy()
        if qtype == gguf.GGMLQuantizationType.F16:
            out[start:start + ROWS_PER_CHUNK] = rows.astype(np.float16)
        else:
            out[start:start + ROWS_PER_CHUNK] = gguf.quants.quantize(rows, qtype)

    list(pool.map(encode_rows, range(0, flat.shape[0], ROWS_PER_CHUNK)))
    return out.reshape(gguf.quant_shape_to_byte_shape(job.shape, qtype) if out.dtype == np.uint8 else job.shape)


def _release_finished(ckpt: Checkpoint, job: TensorJob, following: TensorJob | None) -> None:
    """Drop the source pages a finished part of the file no longer needs (keeps the RSS flat)."""
    if job.name == "token_embd.weight":
        ckpt.release("emb.weight")
    elif job.name == "output.weight":
        ckpt.release("head.weight")
    elif job.name.startswith("blk.") and (following is None or following.name.split(".")[1] != job.name.split(".")[1]):
        prefix = f"blocks.{job.name.split('.')[1]}."
        for key in [k for k in ckpt.tensors if k.startswith(prefix)]:
            ckpt.release(key)


def quant_for_strategy(strategy: Strategy, n_layer: int) -> list[str]:
    """Per slot: fp32 -> f32, fp16 -> f16, bf16 -> bf16, any i8 -> q8_0 (llama.cpp's 8-bit type)."""
    return ["q8_0" if p.weights == "i8" else {"fp32": "f32", "fp16": "f16", "bf16": "bf16"}[p.weights]
            for p in allocate(strategy, n_layer)]


def _tokenizer(writer, gguf, vocab_size: int) -> None:
    world = WorldTokenizer(vocab_size=vocab_size)
    tokens, types = ["<s>"], [gguf.TokenType.CONTROL]
    for idx in range(1, vocab_size):
        if idx in world.id_to_bytes:
            tokens.append(repr(world.id_to_bytes[idx])[2:-1])
            types.append(gguf.TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{idx}]")
            types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model("rwkv")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)
    if vocab_size > EOT_TOKEN:
        writer.add_eot_token_id(EOT_TOKEN)
    writer.add_chat_template("rwkv-world")


@dataclass(frozen=True)
class GgufOptions(Options):
    quant: str = option("f16", "the type of the large matrices (norms, 1-D parameters and LoRAs stay F32)",
                        choices=QUANTS)
    strategy: str | None = option(None, "per-layer types instead of --quant: fp32 -> F32, fp16 -> F16, bf16 -> BF16,"
                                  " any i8 -> Q8_0")


def supports(spec: ModelSpec) -> str | None:
    if spec.version not in ARCHS:
        return (f"llama.cpp has no architecture for RWKV-{spec.version} (rwkv6 runs v5.2 and v6, rwkv7 v7); for this"
                " version use --to onnx, --to safetensors or --to pip")
    if spec.time_state:
        return ("this is a state-tuned model (att.time_state): GGUF has no place for its learned initial state; use"
                " --to onnx, --to safetensors or --to pip, which keep it")
    if spec.deep_embed:
        return "llama.cpp's rwkv7 has no DeepEmbed (ffn.s_emb) tensors; this model cannot be expressed as GGUF"
    if spec.major == 7 and spec.head_size % 64:
        # Measured with llama.cpp through llama-cpp-python 0.3.36: rwkv7 with head sizes 16, 32 and 96 loads but
        # gives wrong logits (max |Δ| 2.6-4.8); 64, 128 and 256 match the reference to 2e-5. rwkv6 runs all.
        return (f"llama.cpp's rwkv7 computes wrong results for head size {spec.head_size} (only multiples of 64"
                " verify); this model cannot be exported to GGUF")
    return None


def write(ckpt: Checkpoint, out: Path, options: GgufOptions) -> list[Path]:
    gguf = _gguf()
    spec, quant, strategy = ckpt.spec, options.quant, options.strategy
    arch = ARCHS[spec.version]
    slot_quants = quant_for_strategy(parse_strategy(strategy), spec.n_layer) if strategy else None
    jobs = {"5.2": v52_jobs, "6": v6_jobs, "7": v7_jobs}[spec.version](ckpt)

    def qtype_of(job: TensorJob):
        name = (slot_quants[job.layer] if slot_quants else quant) if job.quantizable else "f32"
        qtype = getattr(gguf.GGMLQuantizationType, name.upper())
        if qtype not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16,
                         gguf.GGMLQuantizationType.BF16):
            block = gguf.GGML_QUANT_SIZES[qtype][0]
            if job.shape[-1] % block:
                raise UnsupportedError(f"{job.name} has rows of {job.shape[-1]} values, not a multiple of {block}:"
                                       f" it cannot be stored as {name}; use --quant f16 or f32")
        return qtype

    types = [qtype_of(j) for j in jobs]
    file_type = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0",
                 "q4_0": "MOSTLY_Q4_0", "q4_1": "MOSTLY_Q4_1", "q5_0": "MOSTLY_Q5_0", "q5_1": "MOSTLY_Q5_1"}
    writer = gguf.GGUFWriter(None, arch)
    writer.add_type("model")
    writer.add_name(ckpt.path.stem)
    writer.add_context_length(CONTEXT_LENGTH)
    writer.add_embedding_length(spec.n_embd)
    writer.add_block_count(spec.n_layer)
    writer.add_feed_forward_length(spec.ffn_dim)
    writer.add_layer_norm_eps(1e-5)
    writer.add_wkv_head_size(spec.head_size)
    writer.add_head_count(0)
    main_quant = max(slot_quants, key=slot_quants.count) if slot_quants else quant  # the most used type
    writer.add_file_type(getattr(gguf.LlamaFileType, file_type[main_quant]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if spec.major == 7:
        writer.add_decay_lora_rank(spec.lora_ranks["w"])
        writer.add_iclr_lora_rank(spec.lora_ranks["a"])
        writer.add_value_residual_mix_lora_rank(spec.lora_ranks.get("v", spec.lora_ranks["a"]))
        writer.add_gate_lora_rank(spec.lora_ranks["g"])
    else:
        writer.add_time_mix_extra_dim(spec.lora_ranks.get("maa", V52_LORA_RANK))
        writer.add_time_decay_extra_dim(spec.lora_ranks.get("decay", V52_LORA_RANK))
        writer.add_rescale_every_n_layers(0)  # llama.cpp computes in F32: no rescale needed
    _tokenizer(writer, gguf, spec.vocab_size)
    for job, qtype in zip(jobs, types, strict=True):
        if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            dtype = np.dtype(np.float32 if qtype == gguf.GGMLQuantizationType.F32 else np.float16)
            writer.add_tensor_info(job.name, job.shape, dtype, dtype.itemsize * int(np.prod(job.shape)))
        else:
            byte_shape = gguf.quant_shape_to_byte_shape(job.shape, qtype)
            writer.add_tensor_info(job.name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), qtype)

    with AtomicOutput(out) as target:
        try:
            writer.write_header_to_file(target.temp())
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
                for n, (job, qtype) in enumerate(zip(jobs, types, strict=True)):
                    writer.write_tensor_data(_encode(gguf, pool, job, qtype))
                    _release_finished(ckpt, job, jobs[n + 1] if n + 1 < len(jobs) else None)
        finally:
            writer.close()
    return [out]


# ---- reading ---------------------------------------------------------------------------------------------
def _blinkdl_from_rwkv7(get, n_layer: int, c: int) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for i in range(n_layer):
        b, g = f"blocks.{i}.", f"blk.{i}."
        for n, t in zip("rwkvag", get(g + "time_mix_lerp_fused.weight").reshape(6, 1, 1, c), strict=True):
            out[b + f"att.x_{n}"] = t.clone()
        for name in ("w", "a", "v", "g"):
            if i == 0 and name == "v":
                continue  # layer 0 carries copies of a (llama.cpp needs them; BlinkDL files have none)
            out[b + f"att.{name}1"] = get(g + f"time_mix_{name}1.weight").t().contiguous()
            out[b + f"att.{name}2"] = get(g + f"time_mix_{name}2.weight").t().contiguous()
            if name != "g":
                out[b + f"att.{name}0"] = get(g + f"time_mix_{name}0.weight").reshape(1, 1, c)
        out[b + "att.k_k"] = get(g + "time_mix_k_k.weight").reshape(1, 1, c)
        out[b + "att.k_a"] = get(g + "time_mix_k_a.weight").reshape(1, 1, c)
        out[b + "att.r_k"] = get(g + "time_mix_r_k.weight")  # reshaped to [H, N] once H is known
        for name in ("key", "value", "receptance", "output"):
            out[b + f"att.{name}.weight"] = get(g + f"time_mix_{name}.weight")
        out[b + "ffn.x_k"] = get(g + "channel_mix_lerp_k.weight").reshape(1, 1, c)
        out[b + "ffn.key.weight"] = get(g + "channel_mix_key.weight")
        out[b + "ffn.value.weight"] = get(g + "channel_mix_value.weight")
    return out


def _blinkdl_from_rwkv6(get, n_layer: int, c: int, rescale_every: int) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for i in range(n_layer):
        b, g = f"blocks.{i}.", f"blk.{i}."
        scale = 2 ** (i // rescale_every) if rescale_every > 0 else 1  # undo a writer's fp16 rescale
        out[b + "att.time_maa_x"] = get(g + "time_mix_lerp_x.weight").reshape(1, 1, c)
        for n, t in zip("wkvrg", get(g + "time_mix_lerp_fused.weight").reshape(5, 1, 1, c), strict=True):
            out[b + f"att.time_maa_{n}"] = t.clone()
        out[b + "att.time_maa_w1"] = get(g + "time_mix_w1.weight").t().contiguous()
        out[b + "att.time_maa_w2"] = get(g + "time_mix_w2.weight").permute(0, 2, 1).contiguous()
        out[b + "att.time_decay"] = get(g + "time_mix_decay.weight").reshape(1, 1, -1)
        out[b + "att.time_decay_w1"] = get(g + "time_mix_decay_w1.weight").t().contiguous()
        out[b + "att.time_decay_w2"] = get(g + "time_mix_decay_w2.weight").t().contiguous()
        out[b + "att.time_faaaa"] = get(g + "time_mix_first.weight")
        for name in ("key", "value", "receptance", "gate"):
            out[b + f"att.{name}.weight"] = get(g + f"time_mix_{name}.weight")
        out[b + "att.output.weight"] = get(g + "time_mix_output.weight") * scale
        out[b + "ffn.time_maa_k"] = get(g + "channel_mix_lerp_k.weight").reshape(1, 1, c)
        out[b + "ffn.time_maa_r"] = get(g + "channel_mix_lerp_r.weight").reshape(1, 1, c)
        out[b + "ffn.key.weight"] = get(g + "channel_mix_key.weight")
        out[b + "ffn.value.weight"] = get(g + "channel_mix_value.weight") * scale
        out[b + "ffn.receptance.weight"] = get(g + "channel_mix_receptance.weight")
    return out


def read_gguf(path: Path) -> Checkpoint:
    """An RWKV-6/7 GGUF (ours or upstream-converted with the same tensor set) as a BlinkDL-keyed checkpoint,
    dequantised to fp32 with the gguf package."""
    gguf = _gguf()
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError/struct errors on damaged files
        raise RwkvConvertError(f"{path} is not a readable GGUF file: {str(e).splitlines()[0][:160]}") from None
    field = reader.fields.get("general.architecture")
    arch = bytes(field.parts[field.data[0]]).decode() if field else "?"
    if arch not in ("rwkv6", "rwkv7"):
        raise RwkvConvertError(f"{path} is a GGUF for architecture {arch!r}, not rwkv6 or rwkv7")

    def meta(key: str, default=None):
        f = reader.fields.get(f"{arch}.{key}")
        return int(f.parts[f.data[0]][0]) if f else default

    tensors = {t.name: t for t in reader.tensors}

    def get(name: str) -> torch.Tensor:
        if name not in tensors:
            raise RwkvConvertError(f"{path}: tensor {name} is missing; this GGUF does not have llama.cpp's {arch}"
                                   " tensor set")
        t = tensors[name]
        shape = tuple(int(d) for d in reversed(t.shape))  # ggml ne -> numpy order
        data = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
        return torch.from_numpy(np.array(data, dtype=np.float32))  # a writable copy of the mapped data

    n_layer = meta("block_count")
    emb = get("token_embd.weight")
    c = emb.shape[1]
    sd = {"emb.weight": emb, "blocks.0.ln0.weight": get("token_embd_norm.weight"),
          "blocks.0.ln0.bias": get("token_embd_norm.bias"), "ln_out.weight": get("output_norm.weight"),
          "ln_out.bias": get("output_norm.bias"), "head.weight": get("output.weight")}
    for i in range(n_layer):
        b, g = f"blocks.{i}.", f"blk.{i}."
        for src, dst in (("attn_norm", "ln1"), ("attn_norm_2", "ln2"), ("time_mix_ln", "att.ln_x")):
            sd[b + dst + ".weight"] = get(g + src + ".weight")
            sd[b + dst + ".bias"] = get(g + src + ".bias")
    if arch == "rwkv7":
        sd |= _blinkdl_from_rwkv7(get, n_layer, c)
        head_size = meta("wkv.head_size", 64)
        for i in range(n_layer):
            sd[f"blocks.{i}.att.r_k"] = sd[f"blocks.{i}.att.r_k"].reshape(-1, head_size)
    else:
        sd |= _blinkdl_from_rwkv6(get, n_layer, c, meta("rescale_every_n_layers", 0))
    return checkpoint_from_tensors(path, sd, mmapped=False)


_GGUF_LABELS = {"F32": "fp32", "F16": "fp16", "BF16": "bf16", "Q8_0": "q8_0"}


def tensor_schemes(path) -> set[str]:
    """The GGUF's tensor types as tolerance keys (4-5 bit blocks are "q5/q4")."""
    return {_GGUF_LABELS.get(t.tensor_type.name, "q5/q4") for t in _gguf().GGUFReader(path).tensors}


def native(path: Path, strategy: str | None, streams: dict[str, list[int]], split: int, spec: ModelSpec) -> NativeRun:
    """Runs the file in llama.cpp (llama-cpp-python)."""
    if strategy:
        raise RwkvConvertError("a GGUF runs in llama.cpp as it is: drop --strategy (or use --runner ours)")
    tokens = len(next(iter(streams.values())))
    llama = LlamaCppRunner(path, n_ctx=max(64, 2 * tokens))
    outputs = {name: llama.run(toks, split) for name, toks in streams.items()}
    return NativeRun("llama.cpp (llama-cpp-python)", "cpu fp32", outputs, {"fp32"} | tensor_schemes(path))


FORMAT = Format(
    name="gguf", summary="a GGUF file for llama.cpp", runtime="llama.cpp (llama-cpp-python, ollama, LM Studio)",
    sniff=lambda probe: probe.head.startswith(b"GGUF"), read=lambda probe: read_gguf(probe.path), write=write,
    options=GgufOptions, supports=supports, native=native)
