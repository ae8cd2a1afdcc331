"""RWKV-5.x in ONNX: the matrix-valued state per head, S = S*w + k^T v, y = r S (+ the bonus, computed for
every token at once outside the Scan). Layer state: wkv [B, H, N_key, N_value], the pip package's layout."""

from __future__ import annotations

import numpy as np
import torch

from ...arch import v5 as arch_v5
from ...arch.v5 import VERSIONS as VERSIONS
from .emit import Emitter


def prepare_layer(lw: dict, spec, layer_id: int) -> dict:
    # the log of the decay exp(-exp(d)), computed from d, for the sequence graph's chunked recurrence
    lw["att.log_decay"] = -torch.exp(lw["att.time_decay"])
    return arch_v5.prepare_layer(lw, spec, layer_id)


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


CHUNK = 16  # tokens per Scan iteration of the sequence graph
MIN_LOG_DECAY = -60.0  # exp(-60) ~ 1e-26: a decay this strong already erases the state; keeps cumsums finite


def _chunk_step(mask_bias: str, last_index: str):
    """One chunk of c tokens, all [B, H, c, N]: r, k, v and log w. With cum the inclusive cumulative log
    decay, every exponent below is <= 0 (the mask keeps the upper triangle out before exp), so nothing
    overflows however strong the decay:
      y_t = (r_t*exp(cum_{t-1})) S + sum_{j<t} [sum_n r_t k_j exp(cum_{t-1}-cum_j)] v_j
      S'  = S*exp(cum_last) + sum_j (k_j*exp(cum_last-cum_j))^T v_j"""
    def step(g, states, slices):
        (s,) = states
        r, k, v, logw = slices
        cum = g.op("CumSum", logw, g.const(2, np.int64))
        cum_prev = g.op("Sub", cum, logw)
        y = g.op("MatMul", g.op("Mul", r, g.op("Exp", cum_prev)), s)
        decay = g.op("Exp", g.op("Add", g.op("Sub", g.unsqueeze(cum_prev, 3), g.unsqueeze(cum, 2)), mask_bias))
        scores = g.op("ReduceSum", g.op("Mul", g.op("Mul", g.unsqueeze(r, 3), g.unsqueeze(k, 2)), decay),
                      g.const([-1], np.int64), keepdims=0)  # [B, H, c, c]
        y = g.op("Add", y, g.op("MatMul", scores, v))
        last = g.op("Gather", cum, last_index, axis=2)  # [B, H, 1, N]
        k_decayed = g.op("Mul", k, g.op("Exp", g.op("Sub", last, cum)))
        s = g.op("Add", g.op("Mul", s, g.op("Transpose", g.op("Exp", last), perm=[0, 1, 3, 2])),
                 g.op("MatMul", g.op("Transpose", k_decayed, perm=[0, 1, 3, 2]), v))
        return [s], [y]
    return step


def _chunked(E: Emitter, r: str, k: str, v: str, logw: str, state: str) -> tuple[str, str]:
    """The sequence graph's recurrence, CHUNK tokens per Scan step (T padded with tokens that neither decay
    nor add to the state). Inputs fp32 [B, T, H, N]; returns y [B, T, H, N] and the state."""
    g = E.g
    n_head_size = g.op("Shape", r, start=2)  # [H, N]
    time = g.op("Shape", r, start=1, end=2)
    pad = g.op("Mod", g.op("Sub", g.const([CHUNK], np.int64), g.op("Mod", time, g.const([CHUNK], np.int64))),
               g.const([CHUNK], np.int64))
    pads = g.op("Concat", g.const([0, 0, 0, 0, 0], np.int64), pad, g.const([0, 0], np.int64), axis=0)
    chunk_shape = g.op("Concat", g.const([0, -1, CHUNK], np.int64), n_head_size, axis=0)

    def chunks(x):  # [B, T, H, N] -> [B, n_chunks, H, c, N]
        return g.op("Transpose", g.op("Reshape", g.op("Pad", x, pads), chunk_shape), perm=[0, 1, 3, 2, 4])

    mask = np.where(np.tril(np.ones((CHUNK, CHUNK)), -1) > 0, 0.0, -1e30)[:, :, None]  # keep j < t
    step = _chunk_step(g.const(mask), g.const([CHUNK - 1], np.int64))
    (s,), (y,) = g.recurrence(step, [state], [chunks(t) for t in (r, k, v, logw)], [E.F32] * 6, 1)
    y = g.op("Reshape", g.op("Transpose", y, perm=[0, 1, 3, 2, 4]), g.op("Concat", g.const([0, -1], np.int64),
                                                                          n_head_size, axis=0))
    y = g.op("Slice", y, g.const([0], np.int64), time, g.const([1], np.int64))
    return y, s


def wkv(E: Emitter, spec, r: str, k: str, v: str, w_const: str | None, w_seq: str | None, u: str, state: str,
        log_w: str | None) -> tuple:
    """r, k, v: fp32 [B, T, H, N]; u: [H, N|1]; log_w: log of the decay, [H, N|1] or [B, T, H, N].
    Returns (y [B, T, H*N] fp32, new state). One-token graphs take one plain step (w_const/w_seq, the
    decay itself); sequence graphs run the chunked form."""
    g = E.g
    bonus = g.op("Mul", g.op("ReduceSum", g.op("Mul", g.op("Mul", r, u), k), g.const([-1], np.int64), keepdims=1), v)
    if g.single_step:
        seqs = [g.unsqueeze(r, 3), g.unsqueeze(k, 4), g.unsqueeze(v, 3)] + ([w_seq] if w_seq is not None else [])
        (s,), (y,) = g.recurrence(wkv_step(w_const), [state], seqs, [E.F32] * (len(seqs) + 2), 1)
        y = g.squeeze(y, 3)
    else:
        log_w = g.op("Max", g.op("Expand", log_w, g.op("Shape", r)), g.const(MIN_LOG_DECAY))  # [B, T, H, N]
        y, s = _chunked(E, r, k, v, log_w, state)
    return g.reshape(g.op("Add", y, bonus), [0, 0, -1]), s


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
    log_w = None if g.single_step else E.param(a + "log_decay", lw["att.log_decay"].reshape(H, -1), fp32=True)
    u = E.param(a + "bonus", lw["att.bonus"].reshape(H, -1), fp32=True)
    y, state = wkv(E, spec, r, k, v, w, None, u, state, log_w)
    y = E.to_act(E.group_norm(y, H, a + "ln_x", lw["att.ln_x.weight"], lw["att.ln_x.bias"], fp32=True))
    if "g" in p:
        y = g.op("Mul", y, E.silu(p["g"]))
    return E.linear(y, a + "output.weight", lw["att.output.weight"]), state


def channel_mix(E: Emitter, spec, lw: dict, prefix: str, x: str, last: str, ctx: dict) -> str:
    sx = E.shifted(x, last)
    f = prefix + "ffn."
    kx, rx = (E.lerp(x, sx, f + f"time_mix_{n}", lw[f"ffn.time_mix_{n}"]) for n in "kr")
    return E.gated_ffn(kx, rx, prefix, lw)
