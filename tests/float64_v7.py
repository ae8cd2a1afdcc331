"""RWKV-7 with DeepEmbed ("7a") and DEA ("7b") in float64, written from ../shared/reference/deepembed-and-dea.md
and the pip package's v7 math, separately from the runner (no rwkv_convert code): whole sequences from an
empty state, position by position, with each per-token table folded in full (fixtures are small)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _ln(x, sd, name, eps=1e-5):
    return F.layer_norm(x, (x.shape[-1],), sd[name + ".weight"], sd[name + ".bias"], eps)


def _vec(t):
    return t.reshape(-1)


def _time_mix(sd, b, xx, v_first, n_head):
    T, C = xx.shape
    N = C // n_head
    prev = torch.cat((torch.zeros(1, C, dtype=xx.dtype), xx[:-1]))
    mix = {n: xx + (prev - xx) * _vec(sd[b + f"att.x_{n}"]) for n in "rwkvag"}
    r = mix["r"] @ sd[b + "att.receptance.weight"].t()
    k = mix["k"] @ sd[b + "att.key.weight"].t()
    v = mix["v"] @ sd[b + "att.value.weight"].t()
    w = torch.tanh(mix["w"] @ sd[b + "att.w1"]) @ sd[b + "att.w2"]
    a = torch.sigmoid(_vec(sd[b + "att.a0"]) + (mix["a"] @ sd[b + "att.a1"]) @ sd[b + "att.a2"])
    g = torch.sigmoid(mix["g"] @ sd[b + "att.g1"]) @ sd[b + "att.g2"]
    kk = k * _vec(sd[b + "att.k_k"])
    kk = torch.stack([F.normalize(row.view(n_head, N), dim=-1).reshape(C) for row in kk])
    k = k * (1 + (a - 1) * _vec(sd[b + "att.k_a"]))
    if v_first is None:
        v_first = v
    else:
        v = v + (v_first - v) * torch.sigmoid(_vec(sd[b + "att.v0"]) + (mix["v"] @ sd[b + "att.v1"]) @ sd[b + "att.v2"])
    decay = torch.exp(-math.exp(-0.5) * torch.sigmoid(_vec(sd[b + "att.w0"]) + w))
    S = torch.zeros(n_head, N, N, dtype=xx.dtype)  # [head, value, key]
    out = torch.zeros(T, C, dtype=xx.dtype)
    for t in range(T):
        for h in range(n_head):
            s = slice(h * N, (h + 1) * N)
            S[h] = S[h] * decay[t, s].unsqueeze(0) + torch.outer(S[h] @ -kk[t, s], kk[t, s] * a[t, s]) \
                + torch.outer(v[t, s], k[t, s])
            out[t, s] = S[h] @ r[t, s]
    out = F.group_norm(out, n_head, sd[b + "att.ln_x.weight"], sd[b + "att.ln_x.bias"], eps=64e-5)
    r_k = sd[b + "att.r_k"].reshape(n_head, N)
    bonus = ((r * k).view(T, n_head, N) * r_k).sum(-1, keepdim=True) * v.view(T, n_head, N)
    out = out + bonus.reshape(T, C)
    return (out * g) @ sd[b + "att.output.weight"].t(), v_first


def _dea(sd, b, x, tokens, E):
    """The page's attention over a whole sequence (x: the layer's input residual)."""
    T = x.shape[0]
    k_emb = sd[b + "qkv.k_emb.weight"][tokens] + E[tokens] @ sd[b + "qkv.k_emb_x.weight"].t()
    v_emb = sd[b + "qkv.v_emb.weight"][tokens] + E[tokens] @ sd[b + "qkv.v_emb_x.weight"].t()
    q = x @ sd[b + "qkv.qq.weight"].t()
    k = ((x @ sd[b + "qkv.k1"]) @ sd[b + "qkv.k2"]) * k_emb
    v = torch.tanh((x @ sd[b + "qkv.v1"]) @ sd[b + "qkv.v2"]) * v_emb

    def shift(t):
        return torch.cat((torch.zeros(1, t.shape[1], dtype=t.dtype), t[:-1]))

    q = q + (shift(q) - q) * _vec(sd[b + "qkv.x_q"])
    k = k + (shift(k) - k) * _vec(sd[b + "qkv.x_k"])
    v = v + (shift(v) - v) * _vec(sd[b + "qkv.x_v"])
    q, k, v = _ln(q, sd, b + "qkv.lnq"), _ln(k, sd, b + "qkv.lnk"), _ln(v, sd, b + "qkv.lnv")
    out = torch.zeros(T, v.shape[1], dtype=x.dtype)
    for t in range(T):  # position t sees positions 0..t
        scores = 64 * torch.tanh((k[: t + 1] @ q[t]) / 1024)
        out[t] = torch.softmax(scores, dim=0) @ v[: t + 1]
    return out


def _channel_mix(sd, b, xx, tokens, E):
    C = xx.shape[1]
    prev = torch.cat((torch.zeros(1, C, dtype=xx.dtype), xx[:-1]))
    k = xx + (prev - xx) * _vec(sd[b + "ffn.x_k"])
    k = torch.relu(k @ sd[b + "ffn.key.weight"].t()) ** 2
    if b + "ffn.s1" in sd:
        r = sd[b + "ffn.s1"].shape[1]
        table = sd[b + "ffn.s_emb.weight"][tokens] + E[tokens] @ sd[b + "ffn.s_emb_x.weight"].t()
        ss = torch.stack([(xx[t] @ sd[b + "ffn.s1"]) @ table[t].view(r, r) for t in range(xx.shape[0])])
        k = k * (ss @ sd[b + "ffn.s2"] + _vec(sd[b + "ffn.s0"]))
    return k @ sd[b + "ffn.value.weight"].t()


def logits_float64(state_dict: dict, tokens: list[int]) -> torch.Tensor:
    """[T, V] logits of `tokens` from an empty state."""
    sd = {k: v.double() for k, v in state_dict.items()}
    n_layer = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    n_head = sd["blocks.0.att.r_k"].shape[0]
    E = _ln(sd["emb.weight"], sd, "blocks.0.ln0")
    ids = torch.tensor(tokens)
    x = E[ids]
    v_first = None
    for i in range(n_layer):
        b = f"blocks.{i}."
        att, v_first = _time_mix(sd, b, _ln(x, sd, b + "ln1"), v_first, n_head)
        if b + "qkv.qq.weight" in sd:
            att = att + _dea(sd, b, x, ids, E)
        x = x + att
        x = x + _channel_mix(sd, b, _ln(x, sd, b + "ln2"), ids, E)
    return _ln(x, sd, "ln_out") @ sd["head.weight"].t()
