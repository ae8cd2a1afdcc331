"""llama.cpp's tensor names for rwkv6 and rwkv7, one row per GGUF tensor: which of our tensors it is made from,
its shape in the file, how it is laid out, and how it is read back. The GGUF writer and reader both walk these
rows (formats/gguf_file.py); tests check them against gguf-py's own MODEL_TENSORS.

Shapes are numpy order (ggml's ne reversed). Layouts: "copy" (reshaped only), "t" (2-D transpose: llama.cpp
stores the LoRAs [out, in]), "swap12" (3-D, last two axes swapped). A row with several sources stacks them
along a new first axis (reading splits them again). `make` synthesises a tensor our checkpoint does not have
(v5.2 written as rwkv6); such rows are not read back. `ours_shape` is the shape our tensor takes when read
back ("N" stands for the head size)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..spec import ModelSpec


def rwkv6_lora_ranks(n_embd: int) -> tuple[int, int]:
    """The token-shift and decay LoRA ranks of the RWKV-6 models (32/64, 64/128 at width 4096): what llama.cpp's
    convert_hf_to_gguf.py assumes for every Rwkv6ForCausalLM, and the ranks of v5.2's zero LoRAs here."""
    return (64, 128) if n_embd == 4096 else (32, 64)
MIX = (1, 1, -1)  # BlinkDL's [1, 1, C] mixes and offsets


@dataclass(frozen=True)
class Row:
    gguf: str  # "{i}": the layer
    ours: tuple[str, ...]  # our keys ("{i}": the layer); several are stacked
    shape: Callable[[ModelSpec, int], tuple[int, ...]]  # (spec, layer) -> the file's shape
    layout: str = "copy"
    quantizable: bool = False  # a large matrix: takes --quant (or the strategy's choice); else F32
    # a LoRA factor: F32 under --quant, as llama-quantize leaves "RWKV's small yet 2D weights"; --target-size
    # plans its type like a matrix's where its measured cost pays (stock llama.cpp multiplies any type)
    lora: bool = False
    ours_shape: tuple | None = None
    make: Callable[[list[torch.Tensor], tuple[int, ...]], torch.Tensor] | None = None  # (sources, shape)
    layer0: tuple[str, ...] | None = None  # layer 0's sources instead (written there, not read back there)
    slot: str = "layer"  # the strategy slot that decides its type: "layer", "first" (layer 0) or "head"


def _c(spec, i):
    return (spec.n_embd,)


def _a(spec, i):
    return (spec.att_dim,)


def _matrix(rows: str, cols: str) -> Callable[[ModelSpec, int], tuple[int, ...]]:
    dims = {"C": lambda s: s.n_embd, "A": lambda s: s.att_dim, "F": lambda s: s.ffn_dim, "V": lambda s: s.vocab_size}
    return lambda spec, i: (dims[rows](spec), dims[cols](spec))


GLOBAL = (
    Row("token_embd.weight", ("emb.weight",), _matrix("V", "C"), quantizable=True, slot="first"),  # ln0 not folded
    Row("token_embd_norm.weight", ("blocks.0.ln0.weight",), _c, slot="head"),
    Row("token_embd_norm.bias", ("blocks.0.ln0.bias",), _c, slot="head"),
    Row("output_norm.weight", ("ln_out.weight",), _c, slot="head"),
    Row("output_norm.bias", ("ln_out.bias",), _c, slot="head"),
    Row("output.weight", ("head.weight",), _matrix("V", "C"), quantizable=True, slot="head"),
)
NORMS = tuple(Row(f"blk.{{i}}.{gguf}.{part}", (f"blocks.{{i}}.{ours}.{part}",), _c)
              for gguf, ours in (("attn_norm", "ln1"), ("attn_norm_2", "ln2")) for part in ("weight", "bias"))


def _projections(names: tuple[str, ...]) -> tuple[Row, ...]:
    """The attention's large matrices and ln_x, the same in rwkv6 and rwkv7 (gate only in v6)."""
    return tuple(Row(f"blk.{{i}}.time_mix_{n}.weight", (f"blocks.{{i}}.att.{n}.weight",), _matrix("A", "C"),
                     quantizable=True) for n in names) + tuple(
        Row(f"blk.{{i}}.time_mix_ln.{p}", (f"blocks.{{i}}.att.ln_x.{p}",), _a) for p in ("weight", "bias")) + (
        Row("blk.{i}.time_mix_output.weight", ("blocks.{i}.att.output.weight",), _matrix("C", "A"), quantizable=True),)


def _v7_lora(name: str, rank: str, layer0: str | None = None) -> tuple[Row, ...]:
    """x @ name1 -> ... @ name2 (+ name0): llama.cpp stores the two matrices transposed. layer0: the LoRA
    whose copies llama.cpp wants on layer 0 (which has no value residual of its own)."""
    def r(spec, i):
        return spec.lora_ranks[layer0 if layer0 and i == 0 else rank]

    def on_layer0(part: str):
        return (f"blocks.0.att.{layer0}{part}",) if layer0 else None

    rows = () if name == "g" else (
        Row(f"blk.{{i}}.time_mix_{name}0.weight", (f"blocks.{{i}}.att.{name}0",), _c, ours_shape=MIX,
            layer0=on_layer0("0")),)
    return rows + (
        Row(f"blk.{{i}}.time_mix_{name}1.weight", (f"blocks.{{i}}.att.{name}1",), lambda s, i: (r(s, i), s.n_embd),
            "t", layer0=on_layer0("1"), lora=True),
        Row(f"blk.{{i}}.time_mix_{name}2.weight", (f"blocks.{{i}}.att.{name}2",), lambda s, i: (s.n_embd, r(s, i)),
            "t", layer0=on_layer0("2"), lora=True),
    )


def _vector(gguf: str, ours: str, shape=_c, ours_shape=MIX) -> Row:
    return Row(f"blk.{{i}}.{gguf}.weight", (f"blocks.{{i}}.{ours}",), shape, ours_shape=ours_shape)


RWKV7 = NORMS + (
    Row("blk.{i}.time_mix_lerp_fused.weight", tuple(f"blocks.{{i}}.att.x_{n}" for n in "rwkvag"),
        lambda s, i: (6, 1, 1, s.n_embd), ours_shape=MIX),
    *_v7_lora("w", "w"), *_v7_lora("a", "a"), *_v7_lora("v", "v", layer0="a"), *_v7_lora("g", "g"),
    _vector("time_mix_k_k", "att.k_k"),
    _vector("time_mix_k_a", "att.k_a"),
    _vector("time_mix_r_k", "att.r_k", ours_shape=(-1, "N")),
    *_projections(("key", "value", "receptance")),
    _vector("channel_mix_lerp_k", "ffn.x_k"),
    Row("blk.{i}.channel_mix_key.weight", ("blocks.{i}.ffn.key.weight",), _matrix("F", "C"), quantizable=True),
    Row("blk.{i}.channel_mix_value.weight", ("blocks.{i}.ffn.value.weight",), _matrix("C", "F"), quantizable=True),
)


def _ffn_v6(lerp: Callable[[str], Row]) -> tuple[Row, ...]:
    return (lerp("k"), lerp("r")) + tuple(
        Row(f"blk.{{i}}.channel_mix_{n}.weight", (f"blocks.{{i}}.ffn.{n}.weight",), shape, quantizable=True)
        for n, shape in (("key", _matrix("F", "C")), ("value", _matrix("C", "F")), ("receptance", _matrix("C", "C"))))


def _maa(spec) -> int:
    return spec.lora_ranks["maa"]


def _decay(spec) -> int:
    return spec.lora_ranks["decay"]


def _heads(spec, i):
    return (spec.n_head, spec.head_size)


RWKV6 = NORMS + (
    Row("blk.{i}.time_mix_lerp_x.weight", ("blocks.{i}.att.time_maa_x",), lambda s, i: (1, 1, s.n_embd)),
    Row("blk.{i}.time_mix_lerp_fused.weight", tuple(f"blocks.{{i}}.att.time_maa_{n}" for n in "wkvrg"),
        lambda s, i: (5, 1, 1, s.n_embd), ours_shape=MIX),
    Row("blk.{i}.time_mix_w1.weight", ("blocks.{i}.att.time_maa_w1",), lambda s, i: (5 * _maa(s), s.n_embd), "t",
        lora=True),
    Row("blk.{i}.time_mix_w2.weight", ("blocks.{i}.att.time_maa_w2",), lambda s, i: (5, s.n_embd, _maa(s)), "swap12",
        lora=True),
    _vector("time_mix_decay", "att.time_decay", _a),
    Row("blk.{i}.time_mix_decay_w1.weight", ("blocks.{i}.att.time_decay_w1",), lambda s, i: (_decay(s), s.n_embd),
        "t", lora=True),
    Row("blk.{i}.time_mix_decay_w2.weight", ("blocks.{i}.att.time_decay_w2",), lambda s, i: (s.att_dim, _decay(s)),
        "t", lora=True),
    Row("blk.{i}.time_mix_first.weight", ("blocks.{i}.att.time_faaaa",), _heads),
    *_projections(("key", "value", "receptance", "gate")),
    *_ffn_v6(lambda n: Row(f"blk.{{i}}.channel_mix_lerp_{n}.weight", (f"blocks.{{i}}.ffn.time_maa_{n}",),
                           lambda s, i: (1, 1, s.n_embd))),
)


def _zeros(sources: list[torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    return torch.zeros(shape)


def _one_minus(sources: list[torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    """v5's lerp x*mix + sx*(1-mix) as v6's offset x + (sx-x)*maa: maa = 1 - mix."""
    return 1 - sources[0].float().reshape(shape)


def _fused_v52(sources: list[torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    """w (unused: the decay LoRA is zero), then 1 - mix of k, v, r, g."""
    return torch.stack([torch.zeros(shape[1:])] + [1 - s.float().reshape(shape[1:]) for s in sources])


# RWKV-5.2 as llama.cpp's rwkv6: v6 with its two LoRAs at zero is v5.2 exactly (the decay LoRA adds 0 to
# time_decay, so w = exp(-exp(time_decay)) as in v5.2; the bonus is time_faaaa; the FFN is the same).
RWKV6_FROM_V52 = NORMS + (
    Row("blk.{i}.time_mix_lerp_x.weight", (), lambda s, i: (1, 1, s.n_embd), make=_zeros),
    Row("blk.{i}.time_mix_lerp_fused.weight", tuple(f"blocks.{{i}}.att.time_mix_{n}" for n in "kvrg"),
        lambda s, i: (5, 1, 1, s.n_embd), make=_fused_v52),
    Row("blk.{i}.time_mix_w1.weight", (), lambda s, i: (5 * rwkv6_lora_ranks(s.n_embd)[0], s.n_embd),
        make=_zeros, lora=True),
    Row("blk.{i}.time_mix_w2.weight", (), lambda s, i: (5, s.n_embd, rwkv6_lora_ranks(s.n_embd)[0]),
        make=_zeros, lora=True),
    _vector("time_mix_decay", "att.time_decay", _a),
    Row("blk.{i}.time_mix_decay_w1.weight", (), lambda s, i: (rwkv6_lora_ranks(s.n_embd)[1], s.n_embd),
        make=_zeros, lora=True),
    Row("blk.{i}.time_mix_decay_w2.weight", (), lambda s, i: (s.att_dim, rwkv6_lora_ranks(s.n_embd)[1]),
        make=_zeros, lora=True),
    Row("blk.{i}.time_mix_first.weight", ("blocks.{i}.att.time_faaaa",), _heads),
    *_projections(("key", "value", "receptance", "gate")),
    *_ffn_v6(lambda n: Row(f"blk.{{i}}.channel_mix_lerp_{n}.weight", (f"blocks.{{i}}.ffn.time_mix_{n}",),
                           lambda s, i: (1, 1, s.n_embd), make=_one_minus)),
)

# What each version is written as, and what each architecture is read back as (a name table, keyed by version).
WRITE_TABLES = {"5.2": RWKV6_FROM_V52, "6": RWKV6, "7": RWKV7}
READ_TABLES = {"rwkv6": RWKV6, "rwkv7": RWKV7}
