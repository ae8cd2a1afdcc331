"""RWKV-5.x in ONNX: the matrix-valued state per head, S = S*w + k^T v, y = r S (+ the bonus, computed for
every token at once outside the Scan). Layer state: wkv [B, H, N_key, N_value], the pip package's layout."""

from __future__ import annotations

import numpy as np

from .emit import Emitter


def wkv_state_shape(spec) -> list[int]:
    return [spec.n_head, spec.head_size, spec.head_size]


def wkv_step(w_const: str | None):
    """One token: slices r [B,H,1,N], k [B,H,N,1], v [B,H,1,N] (and w [B,H,N,1] when the decay is per token)."""
    def step(g, states, slices):
        (s,) = states
        r, k, v = slices[:3]
        w = w_const if w_const is not None else slices[3]
        y = g.op("MatMul", r, s)
        s = g.op("Add", g.op("Mul", s, w), g.op("Mul", k, v))
        return [s], [y]
    return step


def wkv(E: Emitter, spec, r: str, k: str, v: str, w_const: str | None, w_seq: str | None, u: str, state: str) -> tuple:
    """r, k, v: fp32 [B, T, H, N]; u: [H, N|1]; returns (y [B, T, H*N] fp32, new state)."""
    g = E.g
    bonus = g.op("Mul", g.op("ReduceSum", g.op("Mul", g.op("Mul", r, u), k), g.const([-1], np.int64), keepdims=1), v)
    seqs = [g.unsqueeze(r, 3), g.unsqueeze(k, 4), g.unsqueeze(v, 3)] + ([w_seq] if w_seq is not None else [])
    (s,), (y,) = g.recurrence(wkv_step(w_const), [state], seqs, [E.F32] * (len(seqs) + 2), 1)
    y = g.op("Add", g.squeeze(y, 3), bonus)
    return g.reshape(y, [0, 0, -1]), s


def time_mix(E: Emitter, spec, lw: dict, prefix: str, x: str, last: str, state: str, ctx: dict):
    g, H = E.g, spec.n_head
    a = prefix + "att."
    sx = E.shifted(x, last)
    names = ["r", "k", "v"] + (["g"] if "att.gate.weight" in lw else [])
    mixed = {n: E.lerp(x, sx, a + f"time_mix_{n}", lw[f"att.time_mix_{n}"]) for n in names}
    full = {"r": "receptance", "k": "key", "v": "value", "g": "gate"}
    p = {n: E.linear(mixed[n], a + f"{full[n]}.weight", lw[f"att.{full[n]}.weight"]) for n in names}
    r, k, v = (E.heads(E.to_f32(p[n]), H) for n in "rkv")
    w = E.param(a + "time_decay", lw["att.time_decay"], fp32=True)  # [H, N|1, 1]
    u = E.param(a + "bonus", lw["att.bonus"].reshape(H, -1), fp32=True)
    y, state = wkv(E, spec, r, k, v, w, None, u, state)
    y = E.to_act(E.group_norm(y, H, a + "ln_x", lw["att.ln_x.weight"], lw["att.ln_x.bias"], fp32=True))
    if "g" in p:
        y = g.op("Mul", y, E.silu(p["g"]))
    return E.linear(y, a + "output.weight", lw["att.output.weight"]), state


def channel_mix(E: Emitter, spec, lw: dict, prefix: str, x: str, last: str) -> str:
    sx = E.shifted(x, last)
    f = prefix + "ffn."
    kx, rx = (E.lerp(x, sx, f + f"time_mix_{n}", lw[f"ffn.time_mix_{n}"]) for n in "kr")
    return E.gated_ffn(kx, rx, prefix, lw)
