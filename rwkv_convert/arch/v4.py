"""RWKV-4: WKV with a running (aa, bb, pp) numerator/denominator/max-exponent per channel."""

from __future__ import annotations

import torch

from .common import channel_mix_lerp, common_shapes, linear, project, residual_block, shifted

VERSIONS = ("4",)
STATE_NAMES = ("att_shift", "att_aa", "att_bb", "att_pp", "ffn_shift")
MATRICES = ("att.key.weight", "att.value.weight", "att.receptance.weight", "att.output.weight",
            "ffn.key.weight", "ffn.value.weight", "ffn.receptance.weight")
FP32_PARAMS = ("att.time_decay", "att.time_first")
PROJECTIONS = ("att.receptance.weight", "att.key.weight", "att.value.weight")
# Facts other layers ask of a version (the formats never branch on version numbers themselves):
DISPLAY_NAMES = {"4": "RWKV-4"}
FP16_RESCALE = True  # x is halved every few layers under fp16 (the pip package's rescale)
PIP_LN0_FOLD = "file"  # the pip package folds ln0 into emb in the file's dtype (before casting)
WKV_STATE_DOC = "aa, bb, pp per channel (fresh: 0, 0, -1e30)"  # the wkv parts of STATE_NAMES, stacked
LLAMA_CPP_ARCH: dict[str, str] = {}  # llama.cpp has no RWKV-4
HF_MODEL_TYPE = {"4": "rwkv"}  # transformers' RwkvForCausalLM
PIP_CONVERTED = True  # the pip package loads files converted for a strategy
PIP_V7_LOADER = False
BONUS_FORMS = False  # the bonus is always time_first (no u / log u choice)


def matches(shapes: dict) -> str | None:
    # v4 is what is left once v5+ markers are ruled out; require its own time-mix key.
    return "4" if "blocks.0.att.time_mix_k" in shapes else None


def describe(shapes: dict) -> dict:
    return {"head_size": None, "n_head": None}


def expected_shapes(spec) -> dict:
    C, A = spec.n_embd, spec.att_dim
    shapes = common_shapes(spec)
    for i in range(spec.n_layer):
        b = f"blocks.{i}."
        shapes.update({
            b + "att.time_decay": (A,), b + "att.time_first": (A,),
            b + "att.time_mix_k": (1, 1, C), b + "att.time_mix_v": (1, 1, C), b + "att.time_mix_r": (1, 1, C),
            b + "ffn.time_mix_k": (1, 1, C), b + "ffn.time_mix_r": (1, 1, C),
            b + "ffn.receptance.weight": (C, C),
        })
    return shapes


def prepare_layer(lw: dict, spec, layer_id: int) -> dict:
    lw["att.time_decay"] = -torch.exp(lw["att.time_decay"].float().flatten())
    lw["att.time_first"] = lw["att.time_first"].float().flatten()
    return lw


def wkv_state_shape(spec) -> tuple[int, ...]:
    return (3, spec.att_dim)


def pip_parameter(name: str, t: torch.Tensor, spec) -> torch.Tensor | None:
    """The pip package's load-time transform of this version's own parameters (name without blocks.i.), or
    None for the tensors every version treats alike."""
    if name == "att.time_decay":
        return -torch.exp(t.float())
    if name == "att.time_first":
        return t.float()
    return None


def from_pip(name: str, t: torch.Tensor, spec) -> tuple[str, torch.Tensor] | None:
    """A pip-converted file's parameter as the runner holds it, or None when it is already that."""
    return None


def init_state(spec, lw: dict, dtype: torch.dtype, device) -> list[torch.Tensor]:
    C, A = spec.n_embd, spec.att_dim
    return [
        torch.zeros(C, dtype=dtype, device=device),
        torch.zeros(A, dtype=torch.float32, device=device),
        torch.zeros(A, dtype=torch.float32, device=device),
        torch.full((A,), -1e30, dtype=torch.float32, device=device),
        torch.zeros(C, dtype=dtype, device=device),
    ]


def wkv4(w, u, k, v, aa, bb, pp):
    """w = -exp(decay), u: [C]; k, v: [T, C] fp32; state aa, bb, pp [C]. -> (wkv [T, C], aa, bb, pp)."""
    wkv = torch.empty_like(k)
    for t in range(k.shape[0]):  # the recurrence is the only per-token work
        kt, vt = k[t], v[t]
        ww = u + kt
        p = torch.maximum(pp, ww)
        e1, e2 = torch.exp(pp - p), torch.exp(ww - p)
        wkv[t] = (e1 * aa + e2 * vt) / (e1 * bb + e2)
        ww = w + pp
        p = torch.maximum(ww, kt)
        e1, e2 = torch.exp(ww - p), torch.exp(kt - p)
        aa, bb, pp = e1 * aa + e2 * vt, e1 * bb + e2, p
    return wkv, aa, bb, pp


RECURRENCE = wkv4  # the torch recurrence; the runner may swap in a kernel with the same signature (ctx)
KERNEL = "wkv4"  # its counterpart in rwkv_convert.cuda.ops and cpu.ops


def time_mix(lw: dict, x: torch.Tensor, state: list, ctx: dict) -> torch.Tensor:
    sx = shifted(x, state[0])
    kx = x * lw["att.time_mix_k"] + sx * (1 - lw["att.time_mix_k"])
    vx = x * lw["att.time_mix_v"] + sx * (1 - lw["att.time_mix_v"])
    rx = x * lw["att.time_mix_r"] + sx * (1 - lw["att.time_mix_r"])
    p = project(lw, {"att.receptance.weight": rx, "att.key.weight": kx, "att.value.weight": vx})
    r = torch.sigmoid(p["att.receptance.weight"])
    k, v = p["att.key.weight"].float(), p["att.value.weight"].float()
    recurrence = ctx.get("recurrence", wkv4)
    wkv, state[1], state[2], state[3] = recurrence(lw["att.time_decay"], lw["att.time_first"], k, v, *state[1:4])
    return linear(r * wkv.to(x.dtype), lw["att.output.weight"])


def layer_forward(lw: dict, x: torch.Tensor, state: list, ctx: dict) -> torch.Tensor:
    return residual_block(lw, x, state, ctx, time_mix, channel_mix_lerp)
