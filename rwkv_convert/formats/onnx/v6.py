"""RWKV-6 in ONNX: v5.2's state with the data-dependent token shift (maa LoRA, one batched MatMul for its five
slices) and a per-token decay that enters the Scan as a sequence."""

from __future__ import annotations

from ...arch.v6 import MAA_ORDER
from ...arch.v6 import VERSIONS as VERSIONS
from ...arch.v6 import prepare_layer as prepare_layer
from .emit import Emitter
from .v5 import wkv


def time_mix(E: Emitter, spec, lw: dict, prefix: str, x: str, last: str, state: str, ctx: dict):
    g, H = E.g, spec.n_head
    a = prefix + "att."
    delta = g.op("Sub", E.shifted(x, last), x)
    xxx = E.offset_mix(x, delta, a + "time_maa_x", lw["att.time_maa_x"])
    rank = lw["att.time_maa_w2"].shape[1]
    lora = g.reshape(g.op("Tanh", E.matmul(xxx, a + "time_maa_w1", lw["att.time_maa_w1"])), [0, 0, 5, 1, rank])
    offsets = g.reshape(E.matmul(lora, a + "time_maa_w2", lw["att.time_maa_w2"]), [0, 0, 5, -1])  # [B, T, 5, C]
    mixed = {}
    for j, n in enumerate(MAA_ORDER):
        mix = g.op("Add", E.param(a + f"time_maa_{n}", lw[f"att.time_maa_{n}"]), g.gather(offsets, j, 2))
        mixed[n] = g.op("Add", x, g.op("Mul", delta, mix))
    full = {"r": "receptance", "k": "key", "v": "value", "g": "gate"}
    p = {n: E.linear(mixed[n], a + f"{full[n]}.weight", lw[f"att.{full[n]}.weight"]) for n in full}
    r, k, v = (E.heads(E.to_f32(p[n]), H) for n in "rkv")
    decay = E.matmul(g.op("Tanh", E.matmul(mixed["w"], a + "time_decay_w1", lw["att.time_decay_w1"])),
                     a + "time_decay_w2", lw["att.time_decay_w2"])
    w = g.op("Add", E.param(a + "time_decay", lw["att.time_decay"], fp32=True), E.heads(E.to_f32(decay), H))
    log_w = g.op("Neg", g.op("Exp", w))  # w = exp(-exp(.)): its log needs no log
    w = g.unsqueeze(g.op("Exp", log_w), 4)  # [B, T, H, N, 1]
    u = E.param(a + "bonus", lw["att.bonus"].reshape(H, -1), fp32=True)
    y, state = wkv(E, spec, r, k, v, None, w, u, state, log_w)
    y = E.to_act(E.group_norm(y, H, a + "ln_x", lw["att.ln_x.weight"], lw["att.ln_x.bias"], fp32=True))
    return E.linear(g.op("Mul", y, E.silu(p["g"])), a + "output.weight", lw["att.output.weight"]), state


def channel_mix(E: Emitter, spec, lw: dict, prefix: str, x: str, last: str, ctx: dict) -> str:
    g = E.g
    delta = g.op("Sub", E.shifted(x, last), x)
    f = prefix + "ffn."
    kx, rx = (E.offset_mix(x, delta, f + f"time_maa_{n}", lw[f"ffn.time_maa_{n}"]) for n in "kr")
    return E.gated_ffn(kx, rx, prefix, lw)
