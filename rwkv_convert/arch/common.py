"""Math shared by several RWKV versions: norms, token shift, channel-mix variants, shape helpers."""

from __future__ import annotations

import torch
import torch.nn.functional as F

LN_EPS = 1e-5
GROUP_NORM_EPS = 64e-5  # the ln_x GroupNorm of v5-v7 (head_size_divisor 8, squared)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), weight=weight, bias=bias, eps=LN_EPS)


def group_norm(x: torch.Tensor, n_head: int, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Per-head normalisation of a [T, H*N] tensor (ln_x)."""
    return F.group_norm(x, n_head, weight=weight, bias=bias, eps=GROUP_NORM_EPS)


def shifted(x: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """The previous token's vector for every position of a [T, C] sequence; `last` ends the prior call."""
    if x.shape[0] == 1:  # decoding: skip the concatenation
        return last.unsqueeze(0).to(x.dtype)
    return torch.cat((last.unsqueeze(0).to(x.dtype), x[:-1]))


def linear(x: torch.Tensor, weight) -> torch.Tensor:
    """x @ W.T for a large matrix held by a weight scheme (float, int8, ...: see rwkv_convert.quant)."""
    return weight.matmul(x)


def lora_product(x: torch.Tensor, factor) -> torch.Tensor:
    """x @ factor (batched for a 3-D factor) for a LoRA factor, returned in x's dtype. On the CPU the runner
    holds factors in faster forms (quant.held_lora_for_cpu: bf16 rows for the C kernel, which multiply
    themselves, or fp32 tensors for a bf16/fp16 layer); a tensor of another dtype computes in its own."""
    if not isinstance(factor, torch.Tensor):
        return factor.left_multiply(x)
    if x.dtype == factor.dtype:
        return torch.matmul(x, factor)
    return torch.matmul(x.to(factor.dtype), factor).to(x.dtype)


PROJECTIONS_KEY = "att.projections"


def project(lw: dict, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{weight name: input} -> {weight name: input @ W.T} for a layer's attention input projections: one
    batched matmul when the stack-projections pass has stacked them, else one matmul each."""
    stacked = lw.get(PROJECTIONS_KEY)
    if stacked is not None:
        return stacked.matmul_many(inputs)
    return {name: linear(x, lw[name]) for name, x in inputs.items()}


def channel_mix_lerp(lw: dict, x: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """v4/v5 FFN: mixes are lerp weights `x*mix + sx*(1-mix)`, gated by a sigmoid receptance."""
    sx = shifted(x, last)
    kx = x * lw["ffn.time_mix_k"] + sx * (1 - lw["ffn.time_mix_k"])
    rx = x * lw["ffn.time_mix_r"] + sx * (1 - lw["ffn.time_mix_r"])
    r = torch.sigmoid(linear(rx, lw["ffn.receptance.weight"]))
    k = torch.relu(linear(kx, lw["ffn.key.weight"])) ** 2
    return r * linear(k, lw["ffn.value.weight"])


def channel_mix_maa(lw: dict, x: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """v6 FFN: mixes are offsets `x + (sx-x)*maa`."""
    sx = shifted(x, last) - x
    kx = x + sx * lw["ffn.time_maa_k"]
    rx = x + sx * lw["ffn.time_maa_r"]
    r = torch.sigmoid(linear(rx, lw["ffn.receptance.weight"]))
    k = torch.relu(linear(kx, lw["ffn.key.weight"])) ** 2
    return r * linear(k, lw["ffn.value.weight"])


def common_shapes(spec) -> dict[str, tuple[int, ...]]:
    """Keys every version has, with their shapes (Linear weights are [out, in])."""
    C, V, A, Fd = spec.n_embd, spec.vocab_size, spec.att_dim, spec.ffn_dim
    shapes: dict[str, tuple[int, ...]] = {
        "emb.weight": (V, C),
        "blocks.0.ln0.weight": (C,),
        "blocks.0.ln0.bias": (C,),
        "ln_out.weight": (C,),
        "ln_out.bias": (C,),
        "head.weight": (V, C),
    }
    for i in range(spec.n_layer):
        b = f"blocks.{i}."
        shapes.update({
            b + "ln1.weight": (C,), b + "ln1.bias": (C,),
            b + "ln2.weight": (C,), b + "ln2.bias": (C,),
            b + "att.key.weight": (A, C), b + "att.value.weight": (A, C),
            b + "att.receptance.weight": (A, C), b + "att.output.weight": (C, A),
            b + "ffn.key.weight": (Fd, C), b + "ffn.value.weight": (C, Fd),
        })
    return shapes


def as_vector(t: torch.Tensor) -> torch.Tensor:
    """[1, 1, C] mixes and offsets as [C], so that they broadcast against [T, C] activations."""
    return t.reshape(-1) if t.dim() == 3 and t.shape[0] == 1 and t.shape[1] == 1 else t


def squeezed(shape) -> tuple[int, ...]:
    return tuple(int(s) for s in shape if s != 1)


def residual_block(lw: dict, x: torch.Tensor, state: list, ctx: dict, time_mix, channel_mix) -> torch.Tensor:
    """One layer of every version: x += att(LN1 x); x += ffn(LN2 x). The first and last state tensors are
    the att and ffn token-shift states (the LayerNorm outputs of the last token)."""
    xx = layer_norm(x, lw["ln1.weight"], lw["ln1.bias"])
    x = x + time_mix(lw, xx, state, ctx)
    state[0] = xx[-1]
    xx = layer_norm(x, lw["ln2.weight"], lw["ln2.bias"])
    x = x + channel_mix(lw, xx, state[-1])
    state[-1] = xx[-1]
    return x
