"""GGUF for llama.cpp (architectures `rwkv6` and `rwkv7`), written straight from BlinkDL `.pth` files.

Tensor names and shapes follow llama.cpp's loader exactly (an extra tensor fails the load); every tensor
that enters an elementwise op stays F32 (norms, 1-D parameters, lerp stacks, LoRAs); `--quant` applies to
the large matrices. Written streaming: tensor infos first (shapes and types are known from the source's
shapes), then each tensor is converted, quantized, written and released. Atomic: temp file, then rename.
See ../shared/reference/gguf.md (in the project's docs) for the facts this follows."""

from __future__ import annotations

import os
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..arch import module_for
from ..atomic import AtomicOutput
from ..calibration import BUNDLED, LayerwiseGptq, activation_importance
from ..checkpoint import Checkpoint
from ..errors import CastWarning, RwkvConvertError, UnsupportedError
from ..plan import Plan, make_plan
from ..precision import storage
from ..quant import gguf_blocks
from ..runtimes.base import ClientRun, verify_modes
from ..runtimes.llama_cpp import CLIENT as LLAMA_CPP
from ..runtimes.llama_cpp import LlamaCppSession
from ..spec import ModelSpec
from . import gguf_vocab
from .base import Format, Options, calibration_method_option, option, per_token_tables_refusal
from .gguf_imatrix import read_imatrix
from .gguf_jobs import TensorJob, tensor_jobs
from .gguf_read import (
    CHECKSUMS_KEY,
    METADATA_CHECKSUM_KEY,
    check_checksums,
    fill_checksums,
    gguf_module,
    read_gguf,
    tensor_schemes,
    tensor_type_counts,
)
from .gguf_size import plan_for_size, size_budget
from .gguf_tables import rwkv6_lora_ranks

# llama-quantize's mixes as it makes them for RWKV (read back from its output for rwkv6 and rwkv7 files): its
# per-tensor rules name attn_v and ffn_down, which RWKV has not, so every matrix takes the base type and only
# output.weight is raised, to Q6_K; _M and _S come out the same. name -> (base type, output type, file type)
MIXES = {"q4_k_m": ("q4_k", "q6_k", "MOSTLY_Q4_K_M"), "q4_k_s": ("q4_k", "q6_k", "MOSTLY_Q4_K_S"),
         "q5_k_m": ("q5_k", "q6_k", "MOSTLY_Q5_K_M"), "q5_k_s": ("q5_k", "q6_k", "MOSTLY_Q5_K_S"),
         "q3_k_l": ("q3_k", "q6_k", "MOSTLY_Q3_K_L"), "q3_k_m": ("q3_k", "q6_k", "MOSTLY_Q3_K_M"),
         "q3_k_s": ("q3_k", "q6_k", "MOSTLY_Q3_K_S"), "q2_k": ("q2_k", "q6_k", "MOSTLY_Q2_K")}
QUANTS = ("f32", "f16", "bf16", "q8_0", "q6_k", "q5_1", "q5_k", "q5_0", "q4_1", "q4_k", "q4_0", "q3_k", *MIXES)
CONTEXT_LENGTH = 1048576  # what upstream writes; RWKV has no context limit


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


def quant_for_plan(plan: Plan) -> list[str]:
    """Per slot of the plan: its float type's GGUF name (the precision table's), any i8 -> q8_0 (llama.cpp's
    8-bit type)."""
    return ["q8_0" if p.weights == "i8" else storage(p.weights).gguf.lower() for p in plan.placements]


@dataclass(frozen=True)
class GgufOptions(Options):
    quant: str = option("f16", "the type of the large matrices (norms, 1-D parameters and LoRAs stay F32); every"
                        " block type is written by our quantizer (the K-quants q6_k ... q3_k too); q4_k_m, q4_k_s,"
                        " q5_k_m, q5_k_s, q3_k_l/m/s and q2_k are llama-quantize's mixes for RWKV (the base type,"
                        " output.weight Q6_K); names in any case",
                        choices=QUANTS, storage="gguf")
    strategy: str | None = option(None, "per-layer types instead of --quant: fp32 -> F32, fp16 -> F16, bf16 -> BF16,"
                                  " any i8 -> Q8_0")
    tokenizer: str | None = option(None, "a byte-level BPE tokenizer.json to embed; default the World vocabulary"
                                   " (World-sized models) or single bytes (smaller ones)")
    target_size: str | None = option(None, "fit the file in this size (60% of the F16 file, or 3.5MB, 2GiB): each"
                                     " large tensor gets the type whose measured cost per byte is least"
                                     " (--calibration's text, default the bundled one)")
    small_matrices: str = option("planned", "with --target-size, RWKV's LoRA-shaped parameters (v7's w1/w2, a1/a2,"
                                 " v1/v2, g1/g2; v6's token-shift and decay LoRAs): planned (each gets the type,"
                                 " F32 to Q2_K, whose measured cost per byte is least, like the matrices) or f32 (kept"
                                 " F32, as llama-quantize keeps them)", choices=("planned", "f32"))
    calibration: str | None = option(None, "a text (or 'bundled') run through the reference runner: its activations"
                                     " guide the rounding of the 2-8-bit blocks (plain GGUF blocks that any llama.cpp"
                                     " runs; see --calibration-method)")
    calibration_method: str = calibration_method_option()
    imatrix: str | None = option(None, "llama.cpp's importance matrix (imatrix.gguf from llama-imatrix, or the legacy"
                                 " .dat; `rwkv-convert imatrix` writes ours): its per-column statistics round the"
                                 " blocks instead of --calibration's (importance-weighted rounding, no GPTQ)")


def needs(spec: ModelSpec, options: GgufOptions) -> str | None:
    return gguf_vocab.needs(spec.vocab_size, options.tokenizer)


def supports(spec: ModelSpec) -> str | None:
    arch = module_for(spec.version).LLAMA_CPP_ARCH.get(spec.version)
    if arch is None:
        return (f"llama.cpp has no architecture for RWKV-{spec.version} (rwkv6 runs v5.2 and v6, rwkv7 v7); for this"
                " version use --to onnx, --to prepared, --to web-rwkv or --to pip")
    if spec.time_state:
        return ("this is a state-tuned model (att.time_state, or --state): llama.cpp's GGUF has no initial-state"
                " field, so its learned state would be lost; use --to onnx or --to prepared"
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
    gguf = gguf_module()
    given_importance = None
    if options.imatrix:  # read (and checked against the model) before anything else is said or done
        if options.calibration or options.target_size:
            raise RwkvConvertError("--imatrix gives the statistics --calibration would measure: give one of them,"
                                   " without --target-size")
        given_importance = read_imatrix(options.imatrix, ckpt)
    spec, quant, strategy = ckpt.spec, options.quant, options.strategy
    arch = module_for(spec.version).LLAMA_CPP_ARCH[spec.version]
    slot_quants = quant_for_plan(make_plan(spec, None, strategy)) if strategy else None
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
    importance = given_importance
    gptq = None
    if options.target_size:  # an unreachable size: said before calibrating
        size_budget(gguf, ckpt, jobs, types, options.target_size, options.small_matrices == "planned")
    elif options.small_matrices != "planned":
        raise RwkvConvertError("--small-matrices chooses what --target-size plans: give --target-size too")
    if options.calibration or options.target_size:  # activation statistics, before anything is written
        importance = activation_importance(ckpt, options.calibration or BUNDLED, head_covariance=True)
        head_moments = importance["head.weight"]
        importance["head.weight"] = torch.diagonal(head_moments).float()  # the per-column importance
    if options.target_size:
        if strategy:
            raise RwkvConvertError("--target-size chooses each tensor's type itself: drop --strategy")
        types = plan_for_size(gguf, ckpt, jobs, types, importance, options.target_size, options.calibration,
                              plan_small=options.small_matrices == "planned")
        quant = max((t.name.lower() for t, j in zip(types, jobs, strict=True) if j.quantizable),
                    key=[t.name.lower() for t in types].count)
    if importance is not None and options.calibration_method == "gptq" and not options.imatrix:
        gptq = LayerwiseGptq(ckpt, options.calibration or BUNDLED, head_moments=head_moments, qtypes={
            j.source: t.name.lower() for j, t in zip(jobs, types, strict=True)
            if j.quantizable and j.source and j.source != "emb.weight" and t.name.lower() in gguf_blocks.CODECS})
    file_type = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0",
                 "q4_0": "MOSTLY_Q4_0", "q4_1": "MOSTLY_Q4_1", "q5_0": "MOSTLY_Q5_0", "q5_1": "MOSTLY_Q5_1",
                 "q6_k": "MOSTLY_Q6_K", "q5_k": "MOSTLY_Q5_K_S", "q4_k": "MOSTLY_Q4_K_S", "q3_k": "MOSTLY_Q3_K_S",
                 "q2_k": "MOSTLY_Q2_K"}
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
        fill_checksums(gguf, target.temp(), crcs)
    return [out]


def client_run(path: Path, strategy: str | None, streams: dict[str, list[int]], split: int,
               spec: ModelSpec) -> ClientRun:
    """Runs the file in llama.cpp (llama-cpp-python)."""
    if strategy:
        raise RwkvConvertError("a GGUF runs in llama.cpp as it is: drop --strategy (or use --runner ours)")
    LLAMA_CPP.check_installed()
    check_checksums(path)  # llama.cpp would run altered data as it is
    tokens = len(next(iter(streams.values())))
    llama = LlamaCppSession(path, n_ctx=max(64, 2 * tokens))
    outputs = {name: verify_modes(llama, toks, split) for name, toks in streams.items()}
    return ClientRun(LLAMA_CPP.name, "cpu fp32", outputs, {"fp32"} | tensor_schemes(path))


FORMAT = Format(
    name="gguf", summary="a GGUF file for llama.cpp", runtime="llama.cpp (llama-cpp-python, ollama, LM Studio)",
    sniff=lambda probe: probe.head.startswith(b"GGUF"), read=lambda probe: read_gguf(probe.path), write=write,
    options=GgufOptions, supports=supports, needs=needs, client_run=client_run, stored=tensor_schemes,
    types=tensor_type_counts)
