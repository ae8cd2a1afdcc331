"""RWKV-6 ("Finch"): v5.2's state with data-dependent token shift (maa LoRA) and per-token decay (LoRA)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import channel_mix_maa, common_shapes, group_norm, linear, lora_product, project, residual_block, shifted
from .v5 import KERNEL as KERNEL  # v5.2's recurrence with a per-token decay
from .v5 import RECURRENCE as RECURRENCE
from .v5 import init_state as init_state  # same state layout and time_state handling as v5
from .v5 import time_state_to_wkv as time_state_to_wkv
from .v5 import wkv
from .v5 import wkv_state_shape as wkv_state_shape

VERSIONS = ("6",)
STATE_NAMES = ("att_shift", "att_kv", "ffn_shift")
MATRICES = ("att.key.weight", "att.value.weight", "att.receptance.weight", "att.gate.weight",
            "att.output.weight", "ffn.key.weight", "ffn.value.weight", "ffn.receptance.weight")
FP32_PARAMS = ("att.time_decay", "att.time_faaaa", "att.ln_x.weight", "att.ln_x.bias")
MAA_ORDER = ("w", "k", "v", "r", "g")  # slice order of time_maa_w2
LORA_PARAMS = ("att.time_maa_w1", "att.time_maa_w2", "att.time_decay_w1", "att.time_decay_w2")  # lora_product
PROJECTIONS = ("att.receptance.weight", "att.key.weight", "att.value.weight", "att.gate.weight")
DISPLAY_NAMES = {"6": "RWKV-6 (Finch)"}
FP16_RESCALE = True
PIP_LN0_FOLD = "file"  # the pip package folds ln0 into emb in the file's dtype (before casting)
WKV_STATE_DOC = "per head [key, value] matrix"
LLAMA_CPP_ARCH = {"6": "rwkv6"}
HF_MODEL_TYPE = {"6": "rwkv6"}  # RWKV/v6-Finch-*-HF, the layout llama.cpp's convert_hf_to_gguf.py reads
PIP_CONVERTED = True
PIP_V7_LOADER = False
BONUS_FORMS = True


def matches(shapes: dict) -> str | None:
    return "6" if "blocks.0.att.time_maa_x" in shapes else None


def describe(shapes: dict) -> dict:
    n_head, head_size = shapes["blocks.0.att.time_faaaa"]
    return {"n_head": int(n_head), "head_size": int(head_size),
            "lora_ranks": {"maa": int(shapes["blocks.0.att.time_maa_w2"][1]),
                           "decay": int(shapes["blocks.0.att.time_decay_w1"][1])}}


def expected_shapes(spec) -> dict:
    C, A, H, N = spec.n_embd, spec.att_dim, spec.n_head, spec.head_size
    Dm, Dd = spec.lora_ranks["maa"], spec.lora_ranks["decay"]
    shapes = common_shapes(spec)
    for i in range(spec.n_layer):
        b = f"blocks.{i}."
        shapes.update({b + f"att.time_maa_{n}": (1, 1, C) for n in ("x",) + MAA_ORDER})
        shapes.update({
            b + "att.time_maa_w1": (C, 5 * Dm), b + "att.time_maa_w2": (5, Dm, C),
            b + "att.time_decay": (1, 1, A), b + "att.time_decay_w1": (C, Dd), b + "att.time_decay_w2": (Dd, A),
            b + "att.time_faaaa": (H, N), b + "att.gate.weight": (A, C),
            b + "att.ln_x.weight": (A,), b + "att.ln_x.bias": (A,),
            b + "ffn.time_maa_k": (1, 1, C), b + "ffn.time_maa_r": (1, 1, C),
            b + "ffn.receptance.weight": (C, C),
        })
        if spec.time_state:
            shapes[b + "att.time_state"] = (H, N, N)
    return shapes


def pip_parameter(name: str, t: torch.Tensor, spec) -> torch.Tensor | None:
    """The pip package's load-time transform of this version's own parameters, or None for the rest."""
    if name in ("att.time_decay", "att.time_faaaa"):  # the decay stays a log-log value: the LoRA adds to it
        return t.float().reshape(spec.n_head, -1, 1)
    return None


def from_pip(name: str, t: torch.Tensor, spec) -> tuple[str, torch.Tensor] | None:
    """A pip-converted file's parameter as the runner holds it, or None when it is already that."""
    if name in ("att.time_first", "att.time_faaaa"):
        return "att.bonus", t.float().reshape(spec.n_head, -1, 1)
    if name == "att.time_decay":
        return name, t.float().reshape(spec.n_head, -1)
    return None


def prepare_layer(lw: dict, spec, layer_id: int) -> dict:
    H = spec.n_head
    lw["att.time_decay"] = lw["att.time_decay"].float().reshape(H, -1)
    lw["att.bonus"] = lw.pop("att.time_faaaa").float().reshape(H, -1, 1)
    lw["att.ln_x.weight"] = lw["att.ln_x.weight"].float()
    lw["att.ln_x.bias"] = lw["att.ln_x.bias"].float()
    return lw


def time_mix(lw: dict, x: torch.Tensor, state: list, ctx: dict) -> torch.Tensor:
    T, H = x.shape[0], lw["att.time_decay"].shape[0]
    sx = shifted(x, state[0]) - x
    xxx = x + sx * lw["att.time_maa_x"]
    lora = torch.tanh(lora_product(xxx, lw["att.time_maa_w1"])).view(T, 5, -1).transpose(0, 1)  # [5, T, Dm]
    offsets = lora_product(lora, lw["att.time_maa_w2"])  # [5, T, C]
    mixed = {n: x + sx * (lw["att.time_maa_" + n] + offsets[j]) for j, n in enumerate(MAA_ORDER)}

    p = project(lw, {"att.receptance.weight": mixed["r"], "att.key.weight": mixed["k"],
                     "att.value.weight": mixed["v"], "att.gate.weight": mixed["g"]})
    r, k, v = (p[n].float().view(T, H, -1) for n in ("att.receptance.weight", "att.key.weight", "att.value.weight"))
    g = F.silu(p["att.gate.weight"])
    decay = lora_product(torch.tanh(lora_product(mixed["w"], lw["att.time_decay_w1"])), lw["att.time_decay_w2"])
    w = torch.exp(-torch.exp(lw["att.time_decay"] + decay.float().view(T, H, -1))).unsqueeze(-1)

    y, state[1] = ctx.get("recurrence", wkv)(r, k, v, w, lw["att.bonus"], state[1])
    y = group_norm(y.view(T, -1), H, lw["att.ln_x.weight"], lw["att.ln_x.bias"]).to(x.dtype)
    return linear(y * g, lw["att.output.weight"])


def layer_forward(lw: dict, x: torch.Tensor, state: list, ctx: dict) -> torch.Tensor:
    return residual_block(lw, x, state, ctx, time_mix, channel_mix_maa)
