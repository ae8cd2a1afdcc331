"""RWKV-7 ("Goose"): generalised delta-rule state update with in-context learning rate `a`, and a value
residual (`v_first`) that flows from layer 0 to every later layer within one call."""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F

from .common import common_shapes, group_norm, linear, project, residual_block, shifted

VERSIONS = ("7",)
STATE_NAMES = ("att_shift", "att_kv", "ffn_shift")
MATRICES = ("att.key.weight", "att.value.weight", "att.receptance.weight", "att.output.weight",
            "ffn.key.weight", "ffn.value.weight")
FP32_PARAMS = ()
PROJECTIONS = ("att.receptance.weight", "att.key.weight", "att.value.weight")
MIXES = ("r", "w", "k", "v", "a", "g")
DECAY_SCALE = math.exp(-0.5)  # w = exp(-e^-0.5 * sigmoid(.)) keeps every decay in (0.545, 1)
DISPLAY_NAMES = {"7": "RWKV-7 (Goose)"}
FP16_RESCALE = False  # RWKV-7 never rescales
PIP_LN0_FOLD = "target"  # the pip package folds ln0 into emb in the strategy's dtype (after casting)
WKV_STATE_DOC = "per head [value, key] matrix"
LLAMA_CPP_ARCH = {"7": "rwkv7"}
HF_MODEL_TYPE = {"7": "rwkv7"}  # the fla-hub layout (rwkv7-hf, fla)
PIP_CONVERTED = False  # the package's RWKV-7 loader reads only original checkpoints
PIP_V7_LOADER = True  # the package needs RWKV_V7_ON=1 (a process of its own) for RWKV-7
BONUS_FORMS = False
DEEP_EMBED_KEYS = ("ffn.s_emb.weight", "ffn.s_emb_x.weight", "ffn.s0", "ffn.s1", "ffn.s2")
# keys a v7 file may hold that the math does not read: layer 0's value-residual LoRA (unused there) and the
# DeepEmbed tensors (spec.deep_embed says so; the runner refuses such models)
IGNORED_KEYS = re.compile(r"^blocks\.0\.att\.v[012]$|^blocks\.\d+\.(" + "|".join(re.escape(k) for k in DEEP_EMBED_KEYS)
                          + ")$")


def matches(shapes: dict) -> str | None:
    return "7" if "blocks.0.att.r_k" in shapes else None


def describe(shapes: dict) -> dict:
    n_head, head_size = shapes["blocks.0.att.r_k"]
    ranks = {name: int(shapes[f"blocks.0.att.{name}1"][1]) for name in ("w", "a", "g")}
    # v1/v2 are unused on layer 0 and often absent there: read the value-residual rank from layer 1.
    for layer in (1, 0):
        if f"blocks.{layer}.att.v1" in shapes:
            ranks["v"] = int(shapes[f"blocks.{layer}.att.v1"][1])
            break
    return {"n_head": int(n_head), "head_size": int(head_size), "lora_ranks": ranks,
            "deep_embed": "blocks.0.ffn.s_emb.weight" in shapes}


def expected_shapes(spec) -> dict:
    C, H, N = spec.n_embd, spec.n_head, spec.head_size
    shapes = common_shapes(spec)
    for i in range(spec.n_layer):
        b = f"blocks.{i}."
        shapes.update({b + f"att.x_{n}": (1, 1, C) for n in MIXES})
        for name in ("w", "a", "g") + (("v",) if i > 0 else ()):
            rank = spec.lora_ranks[name]
            shapes.update({b + f"att.{name}1": (C, rank), b + f"att.{name}2": (rank, C)})
        shapes.update({b + f"att.{n}0": (1, 1, C) for n in ("w", "a") + (("v",) if i > 0 else ())})
        shapes.update({
            b + "att.k_k": (1, 1, C), b + "att.k_a": (1, 1, C), b + "att.r_k": (H, N),
            b + "att.ln_x.weight": (C,), b + "att.ln_x.bias": (C,), b + "ffn.x_k": (1, 1, C),
        })
    return shapes


def prepare_layer(lw: dict, spec, layer_id: int) -> dict:
    lw["att.r_k"] = lw["att.r_k"].float().reshape(spec.n_head, -1)
    # One [6, 1, C] tensor so that the six token-shift mixes are two ops, not twelve.
    lw["att.x_mix"] = torch.stack([lw.pop("att.x_" + n) for n in MIXES]).unsqueeze(1)
    if layer_id == 0:
        for name in ("att.v0", "att.v1", "att.v2"):
            lw.pop(name, None)  # present in some files but never used: layer 0 defines v_first
    return lw


def wkv_state_shape(spec) -> tuple[int, ...]:
    return (spec.n_head, spec.head_size, spec.head_size)


def pip_parameter(name: str, t: torch.Tensor, spec) -> torch.Tensor | None:
    return None  # no pip-converted RWKV-7 files (PIP_CONVERTED)


def from_pip(name: str, t: torch.Tensor, spec) -> tuple[str, torch.Tensor] | None:
    return None


def init_state(spec, lw: dict, dtype: torch.dtype, device) -> list[torch.Tensor]:
    C, H, N = spec.n_embd, spec.n_head, spec.head_size
    return [torch.zeros(C, dtype=dtype, device=device),
            torch.zeros((H, N, N), dtype=torch.float32, device=device),  # [h, value, key]
            torch.zeros(C, dtype=dtype, device=device)]


def wkv7(r, w, k, v, kk, a, s):
    """Delta-rule recurrence per head, all fp32 [T, H, N]; s: [H, N_val, N_key].
    S = S*diag(w) + (S @ -kk) (kk*a)^T + v k^T ;  y = S r."""
    T = r.shape[0]
    removal = -kk
    replace = kk * a
    lhs_v = v.unsqueeze(-1)  # [T, H, N, 1]
    rhs = torch.stack((replace, k), dim=-2)  # [T, H, 2, N]
    w_row, removal_col, r_col = w.unsqueeze(-2), removal.unsqueeze(-1), r.unsqueeze(-1)
    y = torch.empty_like(r)
    for t in range(T):
        sa = s @ removal_col[t]  # [H, N, 1]
        s = torch.baddbmm(s * w_row[t], torch.cat((sa, lhs_v[t]), dim=-1), rhs[t])
        y[t] = (s @ r_col[t]).squeeze(-1)
    return y, s


RECURRENCE = wkv7  # the torch recurrence; the runner may swap in a kernel with the same signature (ctx)
KERNEL = "wkv7"  # its counterpart in rwkv_convert.cuda.ops and cpu.ops


def time_mix(lw: dict, x: torch.Tensor, state: list, ctx: dict) -> torch.Tensor:
    T, H, C = x.shape[0], state[1].shape[0], x.shape[1]
    sx = shifted(x, state[0]) - x
    xr, xw, xk, xv, xa, xg = (x + sx * lw["att.x_mix"]).unbind(0)

    p = project(lw, {"att.receptance.weight": xr, "att.key.weight": xk, "att.value.weight": xv})
    r, k, v = p["att.receptance.weight"], p["att.key.weight"], p["att.value.weight"]
    w = torch.tanh(xw @ lw["att.w1"]) @ lw["att.w2"]
    a = torch.sigmoid(lw["att.a0"] + (xa @ lw["att.a1"]) @ lw["att.a2"])
    g = torch.sigmoid(xg @ lw["att.g1"]) @ lw["att.g2"]

    kk = F.normalize((k * lw["att.k_k"]).view(T, H, -1), dim=-1, p=2.0, eps=1e-12).view(T, C)
    k = k * (1 + (a - 1) * lw["att.k_a"])
    if "v_first" not in ctx:
        ctx["v_first"] = v
    else:
        v = v + (ctx["v_first"].to(v) - v) * torch.sigmoid(lw["att.v0"] + (xv @ lw["att.v1"]) @ lw["att.v2"])
    w = torch.exp(-DECAY_SCALE * torch.sigmoid((lw["att.w0"] + w).float()))

    r, k, v = (t.float().view(T, H, -1) for t in (r, k, v))
    recurrence = ctx.get("recurrence", wkv7)
    y, state[1] = recurrence(r, w.view(T, H, -1), k, v, kk.float().view(T, H, -1), a.float().view(T, H, -1), state[1])
    y = group_norm(y.view(T, C).to(x.dtype), H, lw["att.ln_x.weight"], lw["att.ln_x.bias"])
    bonus = (r * k * lw["att.r_k"]).sum(-1, keepdim=True) * v
    y = y + bonus.view(T, C).to(y.dtype)
    return linear(y * g, lw["att.output.weight"])


def channel_mix(lw: dict, x: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    k = x + (shifted(x, last) - x) * lw["ffn.x_k"]
    return linear(torch.relu(linear(k, lw["ffn.key.weight"])) ** 2, lw["ffn.value.weight"])


def layer_forward(lw: dict, x: torch.Tensor, state: list, ctx: dict) -> torch.Tensor:
    return residual_block(lw, x, state, ctx, time_mix, channel_mix)

