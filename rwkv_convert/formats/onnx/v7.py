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


def channel_mix(E: Emitter, spec, lw: dict, prefix: str, x: str, last: str, ctx: dict) -> str:
    g = E.g
    delta = g.op("Sub", E.shifted(x, last), x)
    k_in = E.offset_mix(x, delta, prefix + "ffn.x_k", lw["ffn.x_k"])
    if "ffn.s1" not in lw:
        return E.squared_relu_ffn(k_in, prefix, lw)
    # DeepEmbed: each token's r x r matrix, gathered from its (folded) table, modulates the hidden units
    f, r = prefix + "ffn.", spec.variant_dims["deep_embed"]
    k = g.op("Relu", E.linear(k_in, f + "key.weight", lw["ffn.key.weight"]))
    k = g.op("Mul", k, k)
    table = g.reshape(E.token_table(f + "s_emb.folded", lw["ffn.s_emb.weight"], ctx["tokens"]), [0, 0, r, r])
    ss = g.reshape(g.op("MatMul", g.unsqueeze(E.matmul(x, f + "s1", lw["ffn.s1"]), 2), table), [0, 0, r])
    k = g.op("Mul", k, g.op("Add", E.matmul(ss, f + "s2", lw["ffn.s2"]), E.param(f + "s0", lw["ffn.s0"])))
    return E.linear(k, f + "value.weight", lw["ffn.value.weight"])


def _shift_in_sequence(g, x: str) -> str:
    """[B, n, D] -> the previous position's row at every position, zeros at position 0."""
    padded = g.op("Pad", x, g.const([0, 1, 0, 0, 0, 0], np.int64))
    return g.op("Slice", padded, g.const([0], np.int64), g.const([-1], np.int64), g.const([1], np.int64))


def dea_attention(E: Emitter, spec, lw: dict, prefix: str, x: str, k_cache: str, v_cache: str, q_last: str,
                  ctx: dict) -> tuple[str, str, str, str]:
    """DEA beside the time mix, in fp32, from the layer's input x [B, T, C] and the layer's caches [B, n, 32]
    and last query [B, Q]: (attention output [B, T, C] in the activation dtype, the caches [B, n+T, 32], the
    last query). Keys and values of every position are rebuilt from the caches, as the runner does."""
    g, q_name = E.g, prefix + "qkv."
    xf = E.to_f32(x)

    def f32(name):
        return E.param(q_name + name, lw["qkv." + name], fp32=True)

    k_cache = g.op("Concat", k_cache, g.op("MatMul", xf, f32("k1")), axis=1)
    v_cache = g.op("Concat", v_cache, g.op("MatMul", xf, f32("v1")), axis=1)
    context = ctx["context_ids"]
    q = g.op("MatMul", xf, E.param(q_name + "qq", lw["qkv.qq.weight"].t(), fp32=True))
    k = g.op("Mul", g.op("MatMul", k_cache, f32("k2")),
             E.token_table(q_name + "k_emb.folded", lw["qkv.k_emb.weight"], context, fp32=True))
    v = g.op("Mul", g.op("Tanh", g.op("MatMul", v_cache, f32("v2"))),
             E.token_table(q_name + "v_emb.folded", lw["qkv.v_emb.weight"], context, fp32=True))
    shifted_q = g.unsqueeze(q_last, 1) if g.single_step else g.op(
        "Concat", g.unsqueeze(q_last, 1), g.op("Slice", q, g.const([0], np.int64), g.const([-1], np.int64),
                                              g.const([1], np.int64)), axis=1)
    q_mixed = g.op("Add", q, g.op("Mul", g.op("Sub", shifted_q, q), f32("x_q")))
    k = g.op("Add", k, g.op("Mul", g.op("Sub", _shift_in_sequence(g, k), k), f32("x_k")))
    v = g.op("Add", v, g.op("Mul", g.op("Sub", _shift_in_sequence(g, v), v), f32("x_v")))
    q_mixed, k, v = (E.layer_norm(t, q_name + norm, lw[f"qkv.{norm}.weight"], lw[f"qkv.{norm}.bias"], fp32=True)
                     for t, norm in ((q_mixed, "lnq"), (k, "lnk"), (v, "lnv")))
    scores = g.op("MatMul", q_mixed, g.op("Transpose", k, perm=[0, 2, 1]))  # [B, T, n]
    scores = g.op("Mul", g.op("Tanh", g.op("Mul", scores, g.const(1 / 1024))), g.const(64.0))  # soft cap
    if not g.single_step:  # one new token sees the whole context; more need the causal mask
        n = g.op("Gather", g.op("Shape", k), g.const(1, np.int64))
        T = g.op("Gather", g.op("Shape", q), g.const(1, np.int64))
        one = g.const(1, np.int64)
        query_positions = g.op("Range", g.op("Sub", n, T), n, one)
        key_positions = g.op("Range", g.const(0, np.int64), n, one)
        future = g.op("Greater", g.unsqueeze(key_positions, 0), g.unsqueeze(query_positions, 1))  # [T, n]
        scores = g.op("Where", future, g.const(float("-inf")), scores)
    out = g.op("MatMul", g.op("Softmax", scores, axis=-1), v)
    return E.to_act(out), k_cache, v_cache, g.gather(q, -1, 1)
