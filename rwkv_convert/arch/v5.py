"""RWKV-5.x: multi-head matrix-valued state. 5.0 base; 5.1 adds a SiLU gate; 5.2 ("Eagle") has per-channel
decay and bonus ([H, N]) instead of per-head."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import channel_mix_lerp, common_shapes, group_norm, linear, project, residual_block, shifted

VERSIONS = ("5.0", "5.1", "5.2")
STATE_NAMES = ("att_shift", "att_kv", "ffn_shift")
MATRICES = ("att.key.weight", "att.value.weight", "att.receptance.weight", "att.gate.weight",
            "att.output.weight", "ffn.key.weight", "ffn.value.weight", "ffn.receptance.weight")
FP32_PARAMS = ("att.time_decay", "att.time_first", "att.time_faaaa", "att.ln_x.weight", "att.ln_x.bias")
PROJECTIONS = ("att.receptance.weight", "att.key.weight", "att.value.weight", "att.gate.weight")
DISPLAY_NAMES = {"5.0": "RWKV-5.0", "5.1": "RWKV-5.1", "5.2": "RWKV-5.2 (Eagle)"}
FP16_RESCALE = True
PIP_LN0_FOLD = "file"  # the pip package folds ln0 into emb in the file's dtype (before casting)
WKV_STATE_DOC = "per head [key, value] matrix"
LLAMA_CPP_ARCH = {"5.2": "rwkv6"}  # v6 with zero LoRAs is v5.2 exactly; 5.0/5.1 have no llama.cpp architecture
HF_MODEL_TYPE = {"5.2": "rwkv6"}  # as v6 with zero LoRAs (the same math), the layout llama.cpp's converter reads
PIP_CONVERTED = True
PIP_V7_LOADER = False
BONUS_FORMS = True  # time_faaaa (u) or, in 5.0/5.1 files, time_first (log u)


def matches(shapes: dict) -> str | None:
    if "blocks.0.att.ln_x.weight" not in shapes or "blocks.0.att.time_decay" not in shapes:
        return None
    if "blocks.0.att.gate.weight" not in shapes:
        return "5.0"
    decay = shapes["blocks.0.att.time_decay"]
    return "5.2" if len(decay) >= 2 and decay[1] > 1 else "5.1"


def describe(shapes: dict) -> dict:
    n_head = int(shapes["blocks.0.att.time_decay"][0])
    att_dim = int(shapes["blocks.0.att.key.weight"][0])
    return {"n_head": n_head, "head_size": att_dim // n_head,
            "bonus_is_log": "blocks.0.att.time_faaaa" not in shapes}


def expected_shapes(spec) -> dict:
    C, A, H, N = spec.n_embd, spec.att_dim, spec.n_head, spec.head_size
    per_channel = spec.version == "5.2"
    shapes = common_shapes(spec)
    for i in range(spec.n_layer):
        b = f"blocks.{i}."
        shapes.update({
            b + "att.time_decay": (H, N) if per_channel else (H,),
            b + ("att.time_first" if spec.bonus_is_log else "att.time_faaaa"): (H, N) if per_channel else (H,),
            b + "att.time_mix_k": (1, 1, C), b + "att.time_mix_v": (1, 1, C), b + "att.time_mix_r": (1, 1, C),
            b + "att.ln_x.weight": (A,), b + "att.ln_x.bias": (A,),
            b + "ffn.time_mix_k": (1, 1, C), b + "ffn.time_mix_r": (1, 1, C),
            b + "ffn.receptance.weight": (C, C),
        })
        if spec.version != "5.0":
            shapes.update({b + "att.time_mix_g": (1, 1, C), b + "att.gate.weight": (A, C)})
        if spec.time_state:
            shapes[b + "att.time_state"] = (H, N, N)
    return shapes


def prepare_bonus_and_decay(lw: dict, spec) -> None:
    """Decay w = exp(-exp(time_decay)) and bonus u, both fp32 [H, N or 1, 1] along the key axis."""
    H = spec.n_head
    lw["att.time_decay"] = torch.exp(-torch.exp(lw["att.time_decay"].float())).reshape(H, -1, 1)
    if "att.time_faaaa" in lw:
        lw["att.bonus"] = lw.pop("att.time_faaaa").float().reshape(H, -1, 1)
    else:
        lw["att.bonus"] = torch.exp(lw.pop("att.time_first").float()).reshape(H, -1, 1)


def prepare_layer(lw: dict, spec, layer_id: int) -> dict:
    prepare_bonus_and_decay(lw, spec)
    lw["att.ln_x.weight"] = lw["att.ln_x.weight"].float()
    lw["att.ln_x.bias"] = lw["att.ln_x.bias"].float()
    return lw


def wkv_state_shape(spec) -> tuple[int, ...]:
    return (spec.n_head, spec.head_size, spec.head_size)


def pip_parameter(name: str, t: torch.Tensor, spec) -> torch.Tensor | None:
    """The pip package's load-time transform of this version's own parameters, or None for the rest."""
    if name == "att.time_decay":
        return torch.exp(-torch.exp(t.float())).reshape(spec.n_head, -1, 1)
    if name in ("att.time_first", "att.time_faaaa"):
        u = t.float() if name == "att.time_faaaa" else torch.exp(t.float())
        return u.reshape(spec.n_head, -1, 1)
    return None


def from_pip(name: str, t: torch.Tensor, spec) -> tuple[str, torch.Tensor] | None:
    """A pip-converted file's parameter as the runner holds it, or None when it is already that."""
    if name in ("att.time_first", "att.time_faaaa"):
        return "att.bonus", t.float().reshape(spec.n_head, -1, 1)
    return None


def time_state_to_wkv(time_state: torch.Tensor) -> torch.Tensor:
    """A learned initial state, stored [h, value, key], as this version's wkv state [h, key, value]."""
    return time_state.float().transpose(1, 2).contiguous()


def init_state(spec, lw: dict, dtype: torch.dtype, device) -> list[torch.Tensor]:
    C, H, N = spec.n_embd, spec.n_head, spec.head_size
    if "att.time_state" in lw:  # state-tuned models start from a learned state
        kv = time_state_to_wkv(lw["att.time_state"]).to(device)
    else:
        kv = torch.zeros((H, N, N), dtype=torch.float32, device=device)
    return [torch.zeros(C, dtype=dtype, device=device), kv, torch.zeros(C, dtype=dtype, device=device)]


def wkv(r, k, v, w, u, s):
    """Linear attention with a matrix state per head. r, k, v: [T, H, N] fp32; w: [H, N|1, 1] or
    [T, H, N, 1] (per token); u: [H, N|1, 1]; s: [H, N_key, N_val]. Returns y [T, H, N] and the state."""
    T = r.shape[0]
    # The bonus term does not depend on the state, so it is computed for all tokens at once.
    y = (r * u.squeeze(-1) * k).sum(-1, keepdim=True) * v
    k_col, v_row, r_row = k.unsqueeze(-1), v.unsqueeze(-2), r.unsqueeze(-2)
    per_token_decay = w.dim() == 4
    for t in range(T):
        y[t] += (r_row[t] @ s).squeeze(-2)
        s = torch.baddbmm(s * (w[t] if per_token_decay else w), k_col[t], v_row[t])
    return y, s


RECURRENCE = wkv  # the torch recurrence; the runner may swap in a kernel with the same signature (ctx)
KERNEL = "wkv5"  # its counterpart in rwkv_convert.cuda.ops and cpu.ops


def time_mix(lw: dict, x: torch.Tensor, state: list, ctx: dict) -> torch.Tensor:
    T, H = x.shape[0], lw["att.time_decay"].shape[0]
    sx = shifted(x, state[0])

    def lerp(name):
        mix = lw["att.time_mix_" + name]
        return x * mix + sx * (1 - mix)

    inputs = {"att.receptance.weight": lerp("r"), "att.key.weight": lerp("k"), "att.value.weight": lerp("v")}
    gated = "att.time_mix_g" in lw  # v5.1+
    if gated:
        inputs["att.gate.weight"] = lerp("g")
    p = project(lw, inputs)
    r, k, v = (p[n].float().view(T, H, -1) for n in ("att.receptance.weight", "att.key.weight", "att.value.weight"))
    y, state[1] = ctx.get("recurrence", wkv)(r, k, v, lw["att.time_decay"], lw["att.bonus"], state[1])
    y = group_norm(y.view(T, -1), H, lw["att.ln_x.weight"], lw["att.ln_x.bias"]).to(x.dtype)
    if gated:
        y = y * F.silu(p["att.gate.weight"])
    return linear(y, lw["att.output.weight"])


def layer_forward(lw: dict, x: torch.Tensor, state: list, ctx: dict) -> torch.Tensor:
    return residual_block(lw, x, state, ctx, time_mix, channel_mix_lerp)
