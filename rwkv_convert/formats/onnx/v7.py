"""RWKV-7 in ONNX: the delta-rule state update as a Scan body, S = S*diag(w) + (S @ -kk)(kk*a)^T + v k^T,
y = S r; the value residual (v_first) passed from layer 0 to the later layers through `ctx`.
Layer state: wkv [B, H, N_value, N_key], the pip package's layout."""

from __future__ import annotations

import numpy as np

from ...arch.v7 import DECAY_SCALE, MIXES
from ...arch.v7 import VERSIONS as VERSIONS
from ...arch.v7 import prepare_layer as prepare_layer
from .emit import Emitter


def _step(g, states, slices):
    (s,) = states
    w_row, removal_col, replace_row, v_col, k_row, r_col = slices
    sa = g.op("MatMul", s, removal_col)  # [B, H, N, 1]
    s = g.op("Add", g.op("Add", g.op("Mul", s, w_row), g.op("Mul", sa, replace_row)), g.op("Mul", v_col, k_row))
    return [s], [g.op("MatMul", s, r_col)]


def time_mix(E: Emitter, spec, lw: dict, prefix: str, x: str, last: str, state: str, ctx: dict):
    g, H = E.g, spec.n_head
    a = prefix + "att."
    delta = g.op("Sub", E.shifted(x, last), x)
    xr, xw, xk, xv, xa, xg = (E.offset_mix(x, delta, a + f"x_{n}", lw["att.x_mix"][j]) for j, n in enumerate(MIXES))
    r = E.linear(xr, a + "receptance.weight", lw["att.receptance.weight"])
    k = E.linear(xk, a + "key.weight", lw["att.key.weight"])
    v = E.linear(xv, a + "value.weight", lw["att.value.weight"])

    def lora(x_in, name):
        return E.matmul(x_in, a + f"{name}1", lw[f"att.{name}1"]), a + f"{name}2"

    h, n2 = lora(xw, "w")
    w = E.matmul(g.op("Tanh", h), n2, lw["att.w2"])
    h, n2 = lora(xa, "a")
    aa = g.op("Sigmoid", g.op("Add", E.param(a + "a0", lw["att.a0"]), E.matmul(h, n2, lw["att.a2"])))
    h, n2 = lora(xg, "g")
    gate = E.matmul(g.op("Sigmoid", h), n2, lw["att.g2"])
    kk = E.heads(g.op("Mul", k, E.param(a + "k_k", lw["att.k_k"])), H)
    norm = g.op("Sqrt", g.op("ReduceSum", g.op("Mul", kk, kk), g.const([-1], np.int64), keepdims=1))
    kk = g.op("Div", kk, g.op("Max", norm, E.scalar(1e-12)))  # F.normalize(eps=1e-12)
    one = E.scalar(1.0)
    k = g.op("Mul", k, g.op("Add", one, g.op("Mul", g.op("Sub", aa, one), E.param(a + "k_a", lw["att.k_a"]))))
    if "v_first" not in ctx:
        ctx["v_first"] = v
    else:
        h, n2 = lora(xv, "v")
        mix = g.op("Sigmoid", g.op("Add", E.param(a + "v0", lw["att.v0"]), E.matmul(h, n2, lw["att.v2"])))
        v = g.op("Add", v, g.op("Mul", g.op("Sub", ctx["v_first"], v), mix))
    w = g.op("Add", E.param(a + "w0", lw["att.w0"]), w)
    w = g.op("Exp", g.op("Mul", g.op("Sigmoid", E.to_f32(w)), g.const(-DECAY_SCALE)))
    r, k, v, w, kk, aa = (E.heads(E.to_f32(t), H) for t in (r, k, v, w, kk, aa))
    seqs = [g.unsqueeze(w, 3), g.unsqueeze(g.op("Neg", kk), 4), g.unsqueeze(g.op("Mul", kk, aa), 3),
            g.unsqueeze(v, 4), g.unsqueeze(k, 3), g.unsqueeze(r, 4)]
    (state,), (y,) = g.recurrence(_step, [state], seqs, [E.F32] * 8, 1)
    y = g.reshape(E.to_act(y), [0, 0, -1])
    y = E.group_norm(y, H, a + "ln_x", lw["att.ln_x.weight"], lw["att.ln_x.bias"], fp32=False)
    bonus = g.op("ReduceSum", g.op("Mul", g.op("Mul", r, k), E.param(a + "r_k", lw["att.r_k"], fp32=True)),
                 g.const([-1], np.int64), keepdims=1)
    y = g.op("Add", y, E.to_act(g.reshape(g.op("Mul", bonus, v), [0, 0, -1])))
    return E.linear(g.op("Mul", y, gate), a + "output.weight", lw["att.output.weight"]), state


def channel_mix(E: Emitter, spec, lw: dict, prefix: str, x: str, last: str) -> str:
    g = E.g
    delta = g.op("Sub", E.shifted(x, last), x)
    k = E.offset_mix(x, delta, prefix + "ffn.x_k", lw["ffn.x_k"])
    return E.squared_relu_ffn(k, prefix, lw)
