"""GGUF for llama.cpp (architectures `rwkv6` and `rwkv7`), written straight from BlinkDL `.pth` files.

Tensor names and shapes follow llama.cpp's loader exactly (an extra tensor fails the load); every tensor
that enters an elementwise op stays F32 (norms, 1-D parameters, lerp stacks, LoRAs); `--quant` applies to
the large matrices. Written streaming: tensor infos first (shapes and types are known from the source's
shapes), then each tensor is converted, quantized, written and released. Atomic: temp file, then rename.
See ../shared/reference/gguf.md (in the project's docs) for the facts this follows."""

from __future__ import annotations

import dataclasses
import os
import warnings
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..arch import module_for
from ..atomic import AtomicOutput
from ..calibration import BUNDLED, LayerwiseGptq, activation_importance, tensor_sensitivity
from ..checkpoint import Checkpoint, checkpoint_from_tensors
from ..errors import CastWarning, RwkvConvertError, UnsupportedError, brief, check_crc32
from ..precision import by_gguf
from ..progress import step
from ..quant import gguf_blocks, size_plan
from ..runtimes.base import ClientRun
from ..runtimes.llama_cpp import CLIENT as LLAMA_CPP
from ..runtimes.llama_cpp import LlamaCppRunner, check_quantizer, llama_quantize
from ..spans import check_spans
from ..spec import ModelSpec
from ..strategy import Strategy, allocate, parse_strategy
from . import gguf_vocab
from .base import Format, Options, calibration_method_option, option, per_token_tables_refusal
from .gguf_tables import GLOBAL, READ_TABLES, WRITE_TABLES, Row, rwkv6_lora_ranks

# llama-quantize's mixes as it makes them for RWKV (read back from its output for rwkv6 and rwkv7 files): its
# per-tensor rules name attn_v and ffn_down, which RWKV has not, so every matrix takes the base type and only
# output.weight is raised, to Q6_K; _M and _S come out the same. name -> (base type, output type, file type)
MIXES = {"q4_k_m": ("q4_k", "q6_k", "MOSTLY_Q4_K_M"), "q4_k_s": ("q4_k", "q6_k", "MOSTLY_Q4_K_S"),
         "q5_k_m": ("q5_k", "q6_k", "MOSTLY_Q5_K_M"), "q5_k_s": ("q5_k", "q6_k", "MOSTLY_Q5_K_S")}
# the 2-3 bit K mixes, made by llama.cpp's own quantizer (llama-cpp-python) from an F16 file of ours, then given
# our CRC-32s: rwkv-convert has no 2-3 bit block packer of its own
LLAMA_MADE = ("q3_k_l", "q3_k_m", "q3_k_s", "q2_k", "q2_k_s")
QUANTS = ("f32", "f16", "bf16", "q8_0", "q6_k", "q5_1", "q5_k", "q5_0", "q4_1", "q4_k", "q4_0", *MIXES, *LLAMA_MADE)
CONTEXT_LENGTH = 1048576  # what upstream writes; RWKV has no context limit
CHECKSUMS_KEY = "rwkv_convert.tensor_crc32"  # ours: each tensor's CRC-32, in tensor-info order (GGUF keeps none)
# ours: CRC-32 of everything before the tensor data (header, metadata, tensor infos), this value counted as zero.
# A flipped metadata value (rescale_every_n_layers 0 -> 1) otherwise read back as other weights.
METADATA_CHECKSUM_KEY = "rwkv_convert.metadata_crc32"


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
    source: str | None = None  # our key, where the file's rows are that tensor's rows (calibration applies)


def _source(row: Row, tensors: dict, spec: ModelSpec, i: int) -> torch.Tensor:
    """The row's tensor, made from our tensors as the file holds it."""
    keys = row.layer0 if i == 0 and row.layer0 else row.ours
    sources = [tensors[k.format(i=i)] for k in keys]
    shape = row.shape(spec, i)
    if row.make is not None:
        t = row.make(sources, shape)
    elif len(sources) > 1:
        t = torch.stack([s.reshape(shape[1:]) for s in sources])
    else:
        t = sources[0]
    if row.layout == "t":
        t = t.t()
    elif row.layout == "swap12":
        t = t.permute(0, 2, 1)
    # llama.cpp's 1-D vectors ([1, 1, C] mixes, [H, N] r_k); any other shape must already match (_encode checks)
    return t.reshape(-1) if len(shape) == 1 else t


def tensor_jobs(ckpt: Checkpoint) -> list[TensorJob]:
    """Every tensor of the file, in order: the globals, then each layer's rows."""
    spec, T = ckpt.spec, ckpt.tensors
    slots = {"first": 0, "head": spec.n_layer}
    jobs = [TensorJob(row.gguf, row.shape(spec, 0), row.quantizable, lambda row=row: _source(row, T, spec, 0),
                      slots[row.slot], _same_rows(row, 0)) for row in GLOBAL]
    for i in range(spec.n_layer):
        jobs += [TensorJob(row.gguf.format(i=i), row.shape(spec, i), row.quantizable,
                           lambda row=row, i=i: _source(row, T, spec, i), i, _same_rows(row, i))
                 for row in WRITE_TABLES[spec.version]]
    return jobs


def _same_rows(row: Row, i: int) -> str | None:
    """Our key whose [out, in] rows the file's rows are (one source, copied as it is), else None."""
    keys = row.layer0 if i == 0 and row.layer0 else row.ours
    if len(keys) != 1 or row.make is not None or row.layout != "copy":
        return None
    return keys[0].format(i=i)


ROWS_PER_CHUNK = 1024


def _encode(gguf, pool: ThreadPoolExecutor, job: TensorJob, qtype, importance: dict | None = None) -> np.ndarray:
    """The tensor's bytes in the file's type. Rows are converted in chunks on all cores, into one output
    array: the fp32 copy of a large matrix never exists whole (a 65536x2048 head would be 0.5 GB). With
    `importance` (calibration), 4-8-bit blocks are rounded by our importance-weighted scale search."""
    source = job.make()
    if tuple(source.shape) != job.shape:
        raise RwkvConvertError(f"internal: {job.name} has shape {tuple(source.shape)}, expected {job.shape}")
    if qtype == gguf.GGMLQuantizationType.F32:
        return source.to(torch.float32).contiguous().numpy()
    flat = source.reshape(-1, job.shape[-1]) if source.dim() > 1 else source.reshape(1, -1)
    calibrated = importance is not None and qtype.name.lower() in gguf_blocks.TYPES + gguf_blocks.K_TYPES
    # columns weighted by their activations where the rows are a matrix we measured; the others (embedding,
    # stacked or transposed tensors) by the search alone
    weights = importance.get(job.source) if calibrated and job.source else None
    column_weights = None if weights is None or weights.numel() != job.shape[-1] else weights.numpy()
    if qtype == gguf.GGMLQuantizationType.F16:
        out = np.empty(flat.shape, dtype=np.float16)
    else:
        out = np.empty(gguf.quant_shape_to_byte_shape(flat.shape, qtype), dtype=np.uint8)

    def encode_rows(start: int) -> None:
        rows = flat[start:start + ROWS_PER_CHUNK].to(torch.float32).numpy()
        if qtype == gguf.GGMLQuantizationType.F16:
            out[start:start + ROWS_PER_CHUNK] = rows.astype(np.float16)
        elif calibrated or qtype.name.lower() in gguf_blocks.K_TYPES:  # gguf-py has no K-quant quantizer
            out[start:start + ROWS_PER_CHUNK] = gguf_blocks.quantize_any(rows, qtype.name.lower(), column_weights)
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


PLAN_TYPES = ("q8_0", "q6_k", "q5_1", "q5_k", "q5_0", "q4_1", "q4_k", "q4_0")
PLAN_SAMPLE_ROWS = 512  # rows per tensor whose rounding error is measured for each type
GGUF_OVERHEAD = 1024  # the header, besides the vocabulary and the per-tensor infos (estimated below)


def _rows_sample(t: torch.Tensor) -> torch.Tensor:
    t = t.float().reshape(-1, t.shape[-1]) if t.dim() > 1 else t.float().reshape(1, -1)
    if t.shape[0] <= PLAN_SAMPLE_ROWS:
        return t
    return t[torch.linspace(0, t.shape[0] - 1, PLAN_SAMPLE_ROWS).long()]


def _tensor_bytes(gguf, job, qtype) -> int:
    if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        return int(np.prod(job.shape)) * (4 if qtype == gguf.GGMLQuantizationType.F32 else 2)
    return int(np.prod(gguf.quant_shape_to_byte_shape(job.shape, qtype)))


def _size_budget(gguf, ckpt: Checkpoint, jobs: list[TensorJob], types: list, options: GgufOptions) -> tuple[int, int]:
    """(--target-size in bytes, the bytes that do not depend on the plan), refused at once where even every
    quantizable tensor at its smallest planned type would not fit: before any calibration is run."""
    overhead = GGUF_OVERHEAD + 56 * len(jobs) + 22 * ckpt.spec.vocab_size  # measured: 11.8 kB at 100 jobs, V257
    fixed = overhead + sum(_tensor_bytes(gguf, j, t) for j, t in zip(jobs, types, strict=True) if not j.quantizable)
    f16 = fixed + sum(_tensor_bytes(gguf, j, gguf.GGMLQuantizationType.F16) for j in jobs if j.quantizable)
    budget = size_plan.parse_target(options.target_size, f16)
    smallest = fixed
    for job, qtype in zip(jobs, types, strict=True):
        if job.quantizable:  # its smallest planned type whose blocks divide its rows, else the type it has
            fits = [getattr(gguf.GGMLQuantizationType, n.upper()) for n in PLAN_TYPES]
            fits = [q for q in fits if job.shape[-1] % gguf.GGML_QUANT_SIZES[q][0] == 0] or [qtype]
            smallest += min(_tensor_bytes(gguf, job, q) for q in fits)
    if budget < smallest:
        raise RwkvConvertError(f"--target-size {options.target_size} = {budget:,} bytes is below the smallest this"
                               f" model can be ({smallest:,} bytes, {smallest / f16:.0%} of F16: every matrix at its"
                               " smallest type); give at least that")
    return budget, fixed


def _plan_for_size(gguf, ckpt: Checkpoint, jobs: list[TensorJob], types: list, importance: dict,
                   options: GgufOptions) -> list:
    """Each quantizable tensor's type, so that the file fits --target-size: every type's rounding error is
    measured (importance-weighted, on a sample of rows), scaled by how much that tensor alone costs the model
    (KL on the calibration text with it at q4_0, through the reference runner), and the planner steps down
    the tensors that cost the least per byte saved (quant.size_plan)."""
    def tensor_bytes(job, qtype) -> int:
        return _tensor_bytes(gguf, job, qtype)

    budget, fixed = _size_budget(gguf, ckpt, jobs, types, options)
    errors: dict[str, dict[str, float]] = {}
    rounded_q4: dict[str, torch.Tensor] = {}
    quantizable = [j for j in jobs if j.quantizable]
    for k, job in enumerate(quantizable):
        step("--target-size: measuring each tensor's types", k, len(quantizable))
        full = job.make()
        rows = _rows_sample(full)
        weights = importance.get(job.source) if job.source else None
        w = weights.numpy() if weights is not None and weights.numel() == rows.shape[1] else None
        errors[job.name] = {}
        for name in PLAN_TYPES:
            qtype = getattr(gguf.GGMLQuantizationType, name.upper())
            block = gguf.GGML_QUANT_SIZES[qtype][0]
            if rows.shape[1] % block:
                continue
            x = rows.numpy()
            packed = gguf_blocks.quantize_any(x, name, w)
            back = gguf.quants.dequantize(packed, qtype).reshape(x.shape)
            err = ((back - x) ** 2 * (w if w is not None else 1.0)).sum() * (np.prod(job.shape[:-1]) / x.shape[0])
            errors[job.name][name] = float(err)
        if job.source and "q4_0" in errors[job.name] and full.dim() == 2:
            x = full.float().numpy()
            q4 = gguf.quants.dequantize(gguf_blocks.quantize(x, "q4_0", w), gguf.GGMLQuantizationType.Q4_0)
            rounded_q4[job.source] = torch.from_numpy(np.ascontiguousarray(q4.reshape(x.shape)))
    kl = tensor_sensitivity(ckpt, options.calibration or BUNDLED, rounded_q4)
    by_source = {j.source: j.name for j in jobs if j.source in kl}
    scale = {by_source[k]: v / max(errors[by_source[k]]["q4_0"], 1e-30) for k, v in kl.items()}
    typical = float(np.median(list(scale.values()))) if scale else 1.0
    candidates = {name: [size_plan.Option(t, tensor_bytes(next(j for j in jobs if j.name == name),
                                                           getattr(gguf.GGMLQuantizationType, t.upper())),
                                          e * scale.get(name, typical)) for t, e in errs.items()]
                  for name, errs in errors.items() if errs}
    chosen = size_plan.plan(candidates, fixed + sum(tensor_bytes(j, t) for j, t in zip(jobs, types, strict=True)
                                                    if j.quantizable and j.name not in candidates), budget)
    counts: dict[str, int] = {}
    for opt in chosen.values():
        counts[opt.qtype] = counts.get(opt.qtype, 0) + 1
    total = fixed + sum(o.nbytes for o in chosen.values())
    warnings.warn(f"--target-size {options.target_size} = {budget:,} bytes: planned {total:,} bytes with "
                  + ", ".join(f"{n} {t.upper()}" for t, n in sorted(counts.items(), key=lambda kv: -kv[1]))
                  + f"; predicted KL {sum(o.error for o in chosen.values()):.3g} (sum of each tensor's own)",
                  CastWarning, stacklevel=3)
    return [getattr(gguf.GGMLQuantizationType, chosen[j.name].qtype.upper()) if j.name in chosen else t
            for j, t in zip(jobs, types, strict=True)]


def quant_for_strategy(strategy: Strategy, n_layer: int) -> list[str]:
    """Per slot: fp32 -> f32, fp16 -> f16, bf16 -> bf16, any i8 -> q8_0 (llama.cpp's 8-bit type)."""
    return ["q8_0" if p.weights == "i8" else {"fp32": "f32", "fp16": "f16", "bf16": "bf16"}[p.weights]
            for p in allocate(strategy, n_layer)]


@dataclass(frozen=True)
class GgufOptions(Options):
    quant: str = option("f16", "the type of the large matrices (norms, 1-D parameters and LoRAs stay F32); the"
                        " K-quants q6_k/q5_k/q4_k are written by our quantizer; q4_k_m, q4_k_s, q5_k_m, q5_k_s are"
                        " llama-quantize's mixes for RWKV (the base type, output.weight Q6_K); q3_k_l/m/s and"
                        " q2_k(_s) are made by llama.cpp's own quantizer (needs llama-cpp-python); names in any case",
                        choices=QUANTS, storage="gguf")
    strategy: str | None = option(None, "per-layer types instead of --quant: fp32 -> F32, fp16 -> F16, bf16 -> BF16,"
                                  " any i8 -> Q8_0")
    tokenizer: str | None = option(None, "a byte-level BPE tokenizer.json to embed; default the World vocabulary"
                                   " (World-sized models) or single bytes (smaller ones)")
    target_size: str | None = option(None, "fit the file in this size (60% of the F16 file, or 3.5MB, 2GiB): each"
                                     " large tensor gets the type whose measured cost per byte is least"
                                     " (--calibration's text, default the bundled one)")
    calibration: str | None = option(None, "a text (or 'bundled') run through the reference runner: its activations"
                                     " guide the rounding of the 4-8-bit blocks (plain GGUF blocks that any llama.cpp"
                                     " runs; see --calibration-method)")
    calibration_method: str = calibration_method_option()


def needs(spec: ModelSpec, options: GgufOptions) -> str | None:
    return gguf_vocab.needs(spec.vocab_size, options.tokenizer)


def supports(spec: ModelSpec) -> str | None:
    arch = module_for(spec.version).LLAMA_CPP_ARCH.get(spec.version)
    if arch is None:
        return (f"llama.cpp has no architecture for RWKV-{spec.version} (rwkv6 runs v5.2 and v6, rwkv7 v7); for this"
                " version use --to onnx, --to safetensors or --to pip")
    if spec.time_state:
        return ("this is a state-tuned model (att.time_state, or --state): llama.cpp's GGUF has no initial-state"
                " field, so its learned state would be lost; use --to onnx or --to safetensors --layout prepared"
                " (or --to pip for v5/v6), which carry it, or convert the base model and keep the state file beside"
                " it (convert-state)")
    if spec.deep_embed or spec.dea:
        return per_token_tables_refusal(spec, "llama.cpp's rwkv7 (GGUF)")
    if arch == "rwkv7" and spec.head_size % 64:
        # Measured with llama.cpp through llama-cpp-python 0.3.36: rwkv7 with head sizes 16, 32 and 96 loads but
        # gives wrong logits (max |Δ| 2.6-4.8); 64, 128 and 256 match the reference to 2e-5. rwkv6 runs all.
        return (f"llama.cpp's rwkv7 computes wrong results for head size {spec.head_size} (only multiples of 64"
                " verify); this model cannot be exported to GGUF")
    return None


def write(ckpt: Checkpoint, out: Path, options: GgufOptions) -> list[Path]:
    if options.quant in LLAMA_MADE:
        return _write_through_llama_quantize(ckpt, out, options)
    gguf = _gguf()
    spec, quant, strategy = ckpt.spec, options.quant, options.strategy
    arch = module_for(spec.version).LLAMA_CPP_ARCH[spec.version]
    slot_quants = quant_for_strategy(parse_strategy(strategy), spec.n_layer) if strategy else None
    jobs = tensor_jobs(ckpt)

    fallbacks: dict[str, str] = {}

    mix = MIXES.get(quant)
    if mix is not None:
        quant = mix[0]

    def qtype_of(job: TensorJob):
        name = (slot_quants[job.layer] if slot_quants else quant) if job.quantizable else "f32"
        if mix is not None and job.name == "output.weight":
            name = mix[1]
        if name in gguf_blocks.K_TYPES and job.shape[-1] % gguf_blocks.SUPER:
            fallbacks[job.name] = name = gguf_blocks.K_FALLBACK[name]  # as llama.cpp does for such rows
        qtype = getattr(gguf.GGMLQuantizationType, name.upper())
        if qtype not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16,
                         gguf.GGMLQuantizationType.BF16):
            block = gguf.GGML_QUANT_SIZES[qtype][0]
            if job.shape[-1] % block:
                raise UnsupportedError(f"{job.name} has rows of {job.shape[-1]} values, not a multiple of {block}:"
                                       f" it cannot be stored as {name}; use --quant f16 or f32")
        return qtype

    types = [qtype_of(j) for j in jobs]
    if fallbacks:
        warnings.warn(f"{len(fallbacks)} tensors have rows that are not whole {gguf_blocks.SUPER}-value super-blocks"
                      f" ({next(iter(fallbacks))}, ...): written as {quant}'s fallback"
                      f" {gguf_blocks.K_FALLBACK[quant]}, as llama.cpp does", CastWarning, stacklevel=2)
    importance = gptq = None
    if options.target_size:
        _size_budget(gguf, ckpt, jobs, types, options)  # an unreachable size is said before the calibration runs
    if options.calibration or options.target_size:  # activation statistics, before anything is written
        importance = activation_importance(ckpt, options.calibration or BUNDLED, head_covariance=True)
        head_moments = importance["head.weight"]
        importance["head.weight"] = torch.diagonal(head_moments).float()  # the per-column importance
    if options.target_size:
        if strategy:
            raise RwkvConvertError("--target-size chooses each tensor's type itself: drop --strategy")
        types = _plan_for_size(gguf, ckpt, jobs, types, importance, options)
        quant = max((t.name.lower() for t, j in zip(types, jobs, strict=True) if j.quantizable),
                    key=[t.name.lower() for t in types].count)
    if importance is not None and options.calibration_method == "gptq":
        gptq = LayerwiseGptq(ckpt, options.calibration or BUNDLED, head_moments=head_moments, qtypes={
            j.source: t.name.lower() for j, t in zip(jobs, types, strict=True)
            if j.quantizable and j.source and j.source != "emb.weight" and t.name.lower() in gguf_blocks.CODECS})
    file_type = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0",
                 "q4_0": "MOSTLY_Q4_0", "q4_1": "MOSTLY_Q4_1", "q5_0": "MOSTLY_Q5_0", "q5_1": "MOSTLY_Q5_1",
                 "q6_k": "MOSTLY_Q6_K", "q5_k": "MOSTLY_Q5_K_S", "q4_k": "MOSTLY_Q4_K_S"}
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
    named = mix[2] if mix and not options.target_size else file_type[main_quant]
    writer.add_file_type(getattr(gguf.LlamaFileType, named))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if arch == "rwkv7":
        writer.add_decay_lora_rank(spec.lora_ranks["w"])
        writer.add_iclr_lora_rank(spec.lora_ranks["a"])
        writer.add_value_residual_mix_lora_rank(spec.lora_ranks.get("v", spec.lora_ranks["a"]))
        writer.add_gate_lora_rank(spec.lora_ranks["g"])
    else:
        maa, decay = rwkv6_lora_ranks(spec.n_embd)  # v5.2's zero LoRAs
        writer.add_time_mix_extra_dim(spec.lora_ranks.get("maa", maa))
        writer.add_time_decay_extra_dim(spec.lora_ranks.get("decay", decay))
        writer.add_rescale_every_n_layers(0)  # llama.cpp computes in F32: no rescale needed
    gguf_vocab.write_vocabulary(writer, gguf, spec.vocab_size, options.tokenizer)
    # as llama.cpp's converter labels models (its parameter count: every tensor written)
    writer.add_size_label(gguf.size_label(sum(int(np.prod(j.shape)) for j in jobs), 0, 0, 0))
    for job, qtype in zip(jobs, types, strict=True):
        if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            dtype = np.dtype(np.float32 if qtype == gguf.GGMLQuantizationType.F32 else np.float16)
            writer.add_tensor_info(job.name, job.shape, dtype, dtype.itemsize * int(np.prod(job.shape)))
        else:
            byte_shape = gguf.quant_shape_to_byte_shape(job.shape, qtype)
            writer.add_tensor_info(job.name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), qtype)

    # Placeholders, filled in once the data is written (the key-value section comes first in the file).
    writer.add_key_value(CHECKSUMS_KEY, [0] * len(jobs), gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT32)
    writer.add_key_value(METADATA_CHECKSUM_KEY, 0, gguf.GGUFValueType.UINT32)
    crcs = []
    with AtomicOutput(out) as target:
        try:
            writer.write_header_to_file(target.temp())
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
                for n, (job, qtype) in enumerate(zip(jobs, types, strict=True)):
                    if gptq is not None and job.source in gptq:
                        data = gptq.blocks(job.source).reshape(gguf.quant_shape_to_byte_shape(job.shape, qtype))
                    else:
                        data = _encode(gguf, pool, job, qtype, importance)
                    crcs.append(zlib.crc32(data))
                    writer.write_tensor_data(data)
                    _release_finished(ckpt, job, jobs[n + 1] if n + 1 < len(jobs) else None)
        finally:
            writer.close()
        _fill_checksums(gguf, target.temp(), crcs)
    return [out]


def _write_through_llama_quantize(ckpt: Checkpoint, out: Path, options: GgufOptions) -> list[Path]:
    """A 2-3 bit K mix: our F16 file (scratch, beside the output's temp), llama.cpp's quantizer on it, and the
    result's tensor and metadata CRC-32s written anew (llama.cpp copies our keys with the F16 file's values)."""
    check_quantizer()  # before anything is written
    if options.strategy or options.target_size or options.calibration:
        raise RwkvConvertError(f"--quant {options.quant} is llama.cpp's own mix: it takes no --strategy,"
                               " --target-size or --calibration")
    gguf = _gguf()
    with AtomicOutput(out) as target:
        scratch = target.temp().with_name(target.temp().name + ".data")  # removed with the temp on failure
        try:
            write(ckpt, scratch, dataclasses.replace(options, quant="f16"))
            llama_quantize(scratch, target.temp(), options.quant)
        finally:
            scratch.unlink(missing_ok=True)
        reader = gguf.GGUFReader(target.temp())
        crcs = [zlib.crc32(np.ascontiguousarray(t.data)) for t in reader.tensors]
        del reader
        _fill_checksums(gguf, target.temp(), crcs)
    return [out]


def _fill_checksums(gguf, path: Path, crcs: list[int]) -> None:
    reader = gguf.GGUFReader(path, "r+")
    field = reader.fields[CHECKSUMS_KEY]
    for index, crc in zip(field.data, crcs, strict=True):
        field.parts[index][0] = crc
    meta = reader.fields[METADATA_CHECKSUM_KEY]
    meta.parts[meta.data[0]][0] = zlib.crc32(_metadata_bytes(reader, meta))
    reader.data.flush()
    del reader


def _metadata_bytes(reader, field) -> bytearray:
    """The bytes before the tensor data, with `field`'s (the metadata checksum's own) 4 value bytes as zeros."""
    data = reader.data
    at = field.parts[field.data[0]].__array_interface__["data"][0] - data.__array_interface__["data"][0]
    section = bytearray(data[:reader.data_offset])
    section[at:at + 4] = bytes(4)
    return section


# ---- reading ---------------------------------------------------------------------------------------------
def _read_row(row: Row, get, i: int, head_size: int) -> dict[str, torch.Tensor]:
    """Our tensors back from the row's GGUF tensor (the inverse of _source)."""
    t = get(row.gguf.format(i=i))
    if row.layout == "t":
        t = t.t().contiguous()
    elif row.layout == "swap12":
        t = t.permute(0, 2, 1).contiguous()
    parts = [p.clone() for p in t.unbind(0)] if len(row.ours) > 1 else [t]
    if row.ours_shape is not None:
        shape = tuple(head_size if d == "N" else d for d in row.ours_shape)
        parts = [p.reshape(shape) for p in parts]
    return {key.format(i=i): part for key, part in zip(row.ours, parts, strict=True)}


def _checksums(path: Path, reader) -> dict[str, int] | None:
    """{tensor name: CRC-32 of its data} where our writer stored them (None in other writers' files)."""
    meta, field = reader.fields.get(METADATA_CHECKSUM_KEY), reader.fields.get(CHECKSUMS_KEY)
    crcs = [int(field.parts[i][0]) for i in field.data] if field is not None else None
    if crcs is not None and len(crcs) != len(reader.tensors):
        raise RwkvConvertError(f"{path}: {CHECKSUMS_KEY} has {len(crcs)} entries for {len(reader.tensors)} tensors;"
                               " the file is damaged")
    if meta is not None:
        try:
            check_crc32(path, "its metadata", _metadata_bytes(reader, meta), int(meta.parts[meta.data[0]][0]))
        except RwkvConvertError:
            if crcs is None or _rewritten_tensors(reader, crcs) < 2:
                raise  # damage: a flipped byte changes the metadata or one tensor, not both
            # llama-quantize (and other tools) copy our keys into a file they rewrite: new metadata, new data
            warnings.warn(f"{path.name} was rewritten by another tool (llama-quantize?) after rwkv-convert wrote it:"
                          " its metadata and tensors no longer match the CRC-32s it carries, so they are not checked;"
                          " verify compares its outputs", CastWarning, stacklevel=3)
            return None
    if crcs is None:
        return None
    return {t.name: crc for t, crc in zip(reader.tensors, crcs, strict=True)}


def _rewritten_tensors(reader, crcs: list[int]) -> int:
    """How many tensors' data differ from the CRC-32s stored for them (a full read: only on a metadata mismatch)."""
    return sum(zlib.crc32(np.ascontiguousarray(t.data)) != crc for t, crc in zip(reader.tensors, crcs, strict=True))


def _open(path: Path):
    """A GGUFReader on the file, its tensor layout checked."""
    try:
        reader = _gguf().GGUFReader(path)
    except Exception as e:  # the reader raises ValueError/struct errors on damaged files
        raise RwkvConvertError(f"{path} is not a readable GGUF file: {brief(e)}") from None
    _check_layout(path, reader)
    return reader


def _check_tensor(path: Path, tensor, crcs: dict[str, int] | None) -> None:
    if crcs is not None:
        check_crc32(path, f"tensor {tensor.name}", np.ascontiguousarray(tensor.data), crcs[tensor.name])


def check_checksums(path: Path) -> None:
    """Every tensor of one of our GGUFs against its stored CRC-32 (nothing to check in other writers' files)."""
    reader = _open(path)
    crcs = _checksums(path, reader)
    for tensor in reader.tensors:
        _check_tensor(path, tensor, crcs)


def _check_layout(path: Path, reader) -> None:
    """Tensor data aligned and never overlapping, as every GGUF writer lays it out: a damaged offset in the tensor
    infos (the format keeps no checksum) would otherwise read another tensor's bytes without a word."""
    field = reader.fields.get("general.alignment")
    align = int(field.parts[field.data[0]][0]) if field else 32
    spans = sorted((int(t.data_offset), int(t.data_offset) + int(t.n_bytes), t.name) for t in reader.tensors)
    for begin, _, name in spans:
        if align <= 0 or (begin - reader.data_offset) % align:
            raise RwkvConvertError(f"{path}: tensor {name} starts at byte {begin:,}, not on the file's {align}-byte"
                                   " alignment; the tensor infos are damaged")
    check_spans(path, [s for s in spans if s[1] > s[0]])  # gaps: alignment padding


def read_gguf(path: Path) -> Checkpoint:
    """An RWKV-6/7 GGUF (ours or upstream-converted with the same tensor set) as a BlinkDL-keyed checkpoint,
    dequantised to fp32 with the gguf package."""
    gguf = _gguf()
    reader = _open(path)
    field = reader.fields.get("general.architecture")
    arch = bytes(field.parts[field.data[0]]).decode(errors="replace") if field else "?"
    if arch not in ("rwkv6", "rwkv7"):
        raise RwkvConvertError(f"{path} is a GGUF for architecture {arch!r}, not rwkv6 or rwkv7")

    def meta(key: str, default=None):
        f = reader.fields.get(f"{arch}.{key}")
        if f is None:
            if default is None:
                raise RwkvConvertError(f"{path} has no {arch}.{key}: it is damaged or not a complete {arch} GGUF")
            return default
        return int(f.parts[f.data[0]][0])

    tensors = {t.name: t for t in reader.tensors}
    crcs = _checksums(path, reader)

    def get(name: str) -> torch.Tensor:
        if name not in tensors:
            raise RwkvConvertError(f"{path}: tensor {name} is missing; this GGUF does not have llama.cpp's {arch}"
                                   " tensor set")
        t = tensors[name]
        _check_tensor(path, t, crcs)
        shape = tuple(int(d) for d in reversed(t.shape))  # ggml ne -> numpy order
        try:
            data = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
        except (ValueError, TypeError, NotImplementedError) as e:  # a type or shape its data does not fit
            raise RwkvConvertError(f"{path}: tensor {name} ({t.tensor_type.name}, {list(shape)}) cannot be read:"
                                   f" {brief(e)}; the file is damaged") from None
        return torch.from_numpy(np.array(data, dtype=np.float32))  # a writable copy of the mapped data

    n_layer, head_size = meta("block_count"), meta("wkv.head_size", 64)
    rescale_every = meta("rescale_every_n_layers", 0)
    sd: dict[str, torch.Tensor] = {}
    for row in GLOBAL:
        sd |= _read_row(row, get, 0, head_size)
    for i in range(n_layer):
        for row in READ_TABLES[arch]:
            if row.make is None and not (i == 0 and row.layer0):
                sd |= _read_row(row, get, i, head_size)
        if rescale_every > 0:  # undo a writer's fp16 rescale
            for key in (f"blocks.{i}.att.output.weight", f"blocks.{i}.ffn.value.weight"):
                sd[key] = sd[key] * 2 ** (i // rescale_every)
    return checkpoint_from_tensors(path, sd, mmapped=False)




def tensor_type_counts(path) -> dict[str, int]:
    """{GGML type name: how many tensors have it}, most common first."""
    counts: dict[str, int] = {}
    for t in _open(Path(path)).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def tensor_schemes(path) -> set[str]:
    """The GGUF's tensor types as their bounds in the precision table (4-6 bit blocks "q5/q4", 2-3 bit "q3/q2")."""
    return {by_gguf(t.tensor_type.name).bound for t in _gguf().GGUFReader(path).tensors}


def client_run(path: Path, strategy: str | None, streams: dict[str, list[int]], split: int,
               spec: ModelSpec) -> ClientRun:
    """Runs the file in llama.cpp (llama-cpp-python)."""
    if strategy:
        raise RwkvConvertError("a GGUF runs in llama.cpp as it is: drop --strategy (or use --runner ours)")
    check_checksums(path)  # llama.cpp would run altered data as it is
    tokens = len(next(iter(streams.values())))
    llama = LlamaCppRunner(path, n_ctx=max(64, 2 * tokens))
    outputs = {name: llama.run(toks, split) for name, toks in streams.items()}
    return ClientRun(LLAMA_CPP.name, "cpu fp32", outputs, {"fp32"} | tensor_schemes(path))


FORMAT = Format(
    name="gguf", summary="a GGUF file for llama.cpp", runtime="llama.cpp (llama-cpp-python, ollama, LM Studio)",
    sniff=lambda probe: probe.head.startswith(b"GGUF"), read=lambda probe: read_gguf(probe.path), write=write,
    options=GgufOptions, supports=supports, needs=needs, client_run=client_run, stored=tensor_schemes,
    types=tensor_type_counts)
