"""RWKV-7 ("Goose"): generalised delta-rule state update with in-context learning rate `a`, and a value
residual (`v_first`) that flows from layer 0 to every later layer within one call."""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F

from .common import common_shapes, group_norm, layer_norm, linear, lora_product, project, shifted

VERSIONS = ("7",)
STATE_NAMES = ("att_shift", "att_kv", "ffn_shift")
MATRICES = ("att.key.weight", "att.value.weight", "att.receptance.weight", "att.output.weight",
            "ffn.key.weight", "ffn.value.weight")
DEA_KEYS = ("qkv.qq.weight", "qkv.k1", "qkv.k2", "qkv.k_emb.weight", "qkv.k_emb_x.weight", "qkv.v1", "qkv.v2",
            "qkv.v_emb.weight", "qkv.v_emb_x.weight", "qkv.x_q", "qkv.x_k", "qkv.x_v", "qkv.lnq.weight",
            "qkv.lnq.bias", "qkv.lnk.weight", "qkv.lnk.bias", "qkv.lnv.weight", "qkv.lnv.bias")
# Per-token tables (one row per token id) and the matrix that folds the ln0'd embedding into each:
# row(t) = table[t] + E[t] @ fold^T. Tables stay memory-mapped in the file's dtype; only rows are read.
TOKEN_TABLES = {"ffn.s_emb.weight": "ffn.s_emb_x.weight", "qkv.k_emb.weight": "qkv.k_emb_x.weight",
                "qkv.v_emb.weight": "qkv.v_emb_x.weight"}
# The variants' small parts run in fp32 whatever the strategy (the attention's softmax and LayerNorms
# and the table folds; they are a few percent of a layer's work)
FP32_PARAMS = tuple(TOKEN_TABLES.values()) + tuple(k for k in DEA_KEYS if k not in TOKEN_TABLES) + ("att.time_state",)
DEA_STATE_NAMES = ("dea_k_cache", "dea_v_cache", "dea_q")  # [n, cache], [n, cache], [query]
CONTEXT_STATE_NAMES = ("context_ids",)  # DEA: the token ids so far [n], after every layer's state
DEA_QUERY_BLOCK = 256  # queries scored at once: a long prompt's scores never take T x n memory
PROJECTIONS = ("att.receptance.weight", "att.key.weight", "att.value.weight")
LORA_PARAMS = ("att.w1", "att.w2", "att.a1", "att.a2", "att.g1", "att.g2", "att.v1", "att.v2")  # lora_product
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
# keys a v7 file may hold that the math does not read: layer 0's value-residual LoRA (unused there)
IGNORED_KEYS = re.compile(r"^blocks\.0\.att\.v[012]$")


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
    details = {"n_head": int(n_head), "head_size": int(head_size), "lora_ranks": ranks,
               "deep_embed": "blocks.0.ffn.s_emb.weight" in shapes, "dea": "blocks.0.qkv.qq.weight" in shapes}
    dims = {}
    if details["deep_embed"]:
        dims["deep_embed"] = int(shapes["blocks.0.ffn.s1"][1])
    if details["dea"]:
        dims["dea_query"] = int(shapes["blocks.0.qkv.qq.weight"][0])
        dims["dea_cache"] = int(shapes["blocks.0.qkv.k1"][1])
    details["variant_dims"] = dims
    details["table_params"] = sum(math.prod(s) for k, s in shapes.items()
                                  if k.startswith("blocks.") and k.split(".", 2)[2] in TOKEN_TABLES)
    return details


def state_names(spec) -> tuple[str, ...]:
    """The state tensors of one layer: plain v7's (the pip package's layout), then DEA's caches."""
    return STATE_NAMES + (DEA_STATE_NAMES if spec.dea else ())


def context_state_names(spec) -> tuple[str, ...]:
    """State tensors after all layers' (DEA: the token ids the caches belong to)."""
    return CONTEXT_STATE_NAMES if spec.dea else ()


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
        if spec.time_state:
            shapes[b + "att.time_state"] = (H, N, N)
        if spec.deep_embed:
            r, V, Fd = spec.variant_dims["deep_embed"], spec.vocab_size, spec.ffn_dim
            shapes.update({b + "ffn.s_emb.weight": (V, r * r), b + "ffn.s_emb_x.weight": (r * r, C),
                           b + "ffn.s1": (C, r), b + "ffn.s2": (r, Fd), b + "ffn.s0": (Fd,)})
        if spec.dea:
            Q, K, V = spec.variant_dims["dea_query"], spec.variant_dims["dea_cache"], spec.vocab_size
            shapes.update({b + "qkv.qq.weight": (Q, C), b + "qkv.k1": (C, K), b + "qkv.k2": (K, Q),
                           b + "qkv.k_emb.weight": (V, Q), b + "qkv.k_emb_x.weight": (Q, C), b + "qkv.v1": (C, K),
                           b + "qkv.v2": (K, C), b + "qkv.v_emb.weight": (V, C), b + "qkv.v_emb_x.weight": (C, C),
                           b + "qkv.x_q": (Q,), b + "qkv.x_k": (Q,), b + "qkv.x_v": (C,)})
            for norm, width in (("lnq", Q), ("lnk", Q), ("lnv", C)):
                shapes.update({b + f"qkv.{norm}.weight": (width,), b + f"qkv.{norm}.bias": (width,)})
    return shapes


def prepare_layer(lw: dict, spec, layer_id: int) -> dict:
    lw["att.r_k"] = lw["att.r_k"].float().reshape(spec.n_head, -1)
    # One [6, 1, C] tensor so that the six token-shift mixes are two ops, not twelve.
    lw["att.x_mix"] = torch.stack([lw.pop("att.x_" + n) for n in MIXES]).unsqueeze(1)
    if layer_id == 0:
        for name in ("att.v0", "att.v1", "att.v2"):
            lw.pop(name, None)  # present in some files but never used: layer 0 defines v_first
    for name in ("ffn.s0", "qkv.x_q", "qkv.x_k", "qkv.x_v"):
        if name in lw:  # stored [1, 1, n] or [n]
            lw[name] = lw[name].reshape(-1)
    return lw


def wkv_state_shape(spec) -> tuple[int, ...]:
    return (spec.n_head, spec.head_size, spec.head_size)


def pip_parameter(name: str, t: torch.Tensor, spec) -> torch.Tensor | None:
    return None  # no pip-converted RWKV-7 files (PIP_CONVERTED)


def from_pip(name: str, t: torch.Tensor, spec) -> tuple[str, torch.Tensor] | None:
    return None


def init_state(spec, lw: dict, dtype: torch.dtype, device) -> list[torch.Tensor]:
    C, H, N = spec.n_embd, spec.n_head, spec.head_size
    kv = time_state_to_wkv(lw["att.time_state"]).to(device) if "att.time_state" in lw \
        else torch.zeros((H, N, N), dtype=torch.float32, device=device)  # [h, value, key]
    state = [torch.zeros(C, dtype=dtype, device=device), kv, torch.zeros(C, dtype=dtype, device=device)]
    if spec.dea:  # empty caches: they grow by one row per token
        cache, query = spec.variant_dims["dea_cache"], spec.variant_dims["dea_query"]
        state += [torch.zeros((0, cache), dtype=torch.float32, device=device),
                  torch.zeros((0, cache), dtype=torch.float32, device=device),
                  torch.zeros(query, dtype=torch.float32, device=device)]
    return state


def time_state_to_wkv(time_state: torch.Tensor) -> torch.Tensor:
    """A learned initial state, stored [h, value, key] as the training kernel holds it: v7's own layout."""
    return time_state.float().contiguous()


def init_context_state(spec, device) -> list[torch.Tensor]:
    return [torch.zeros(0, dtype=torch.long, device=device)] if spec.dea else []


def token_rows(lw: dict, table: str, ids: torch.Tensor, ctx: dict) -> torch.Tensor:
    """fp32 rows of a per-token table for `ids`, with the embedding folded in: only these rows are read from
    the (memory-mapped) table, so the table never has to be in memory."""
    stored = lw[table]
    rows = stored[ids.to(stored.device)].to(device=ids.device, dtype=torch.float32)
    return rows + ctx["embed"](ids) @ lw[TOKEN_TABLES[table]].t()


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


# Chunked prefill (wkv7_chunked): the chunk's tokens are divided by their cumulative decay, which grows up to
# e^(0.607 L); a chunk whose cumulative decay leaves e^(+-CHUNK_LOG_DECAY_LIMIT) (never RWKV-7's own w, which keeps
# in (0.545, 1), at these chunk lengths) runs token by token instead.
CHUNK = 32
CHUNK_LOG_DECAY_LIMIT = 60.0


def wkv7_chunked(r, w, k, v, kk, a, s, chunk: int = CHUNK):
    """wkv7 in chunks of `chunk` tokens, the delta rule in matrix form (the same numbers up to fp32 rounding).
    Within a chunk from state S0, with removal alpha = -kk, replacement beta = kk*a, L_t the cumulative decay
    up to t (inclusive) and c_t = S_{t-1} alpha_t (one number per value row):
      S_t = S0 L_t + sum_{tau<=t} (c_tau beta_tau + v_tau k_tau) (L_t / L_tau)
      c   = (S0 X + V^T K) (I - G)^-1      X[:, t] = L_{t-1} alpha_t,  G[tau, t] = (beta_tau / L_tau) . X[:, t],
                                           K[tau, t] = (k_tau / L_tau) . X[:, t]   (tau < t)
      y_t = S0 (L_t r_t) + sum_{tau<=t} (c_tau beta_tau + v_tau k_tau) / L_tau . L_t r_t
    so the only step-by-step work is a triangular solve of chunk x chunk numbers per row; the rest are matrix
    products. Shapes as wkv7."""
    T = r.shape[0]
    y = torch.empty_like(r)
    for start in range(0, T, chunk):
        end = min(T, start + chunk)
        y[start:end], s = _wkv7_chunk(*(t[start:end] for t in (r, w, k, v, kk, a)), s)
    return y, s


def _wkv7_chunk(r, w, k, v, kk, a, s):
    log_w = torch.log(w).transpose(0, 1)  # [H, L, N]
    cum = log_w.cumsum(1)  # log L_t (inclusive)
    if float(cum.abs().max()) > CHUNK_LOG_DECAY_LIMIT:  # 1 / L_tau would lose the chunk's small terms
        return wkv7(r, w, k, v, kk, a, s)
    r, k, v, kk, a = (t.transpose(0, 1) for t in (r, k, v, kk, a))  # [H, L, N]
    L = r.shape[1]
    decay_in, decay_before = torch.exp(cum), torch.exp(cum - log_w)  # L_t, L_{t-1}
    x = -kk * decay_before  # [H, L, N]: X^T
    beta_t = kk * a / decay_in  # beta_tau / L_tau
    k_t = k / decay_in
    r_hat = r * decay_in
    strict = torch.ones(L, L, dtype=torch.bool, device=r.device).triu(1)  # [tau, t]: tau < t
    upto = torch.ones(L, L, dtype=torch.bool, device=r.device).triu(0)  # tau <= t
    g = (beta_t @ x.transpose(1, 2)) * strict  # [H, tau, t]
    kx = (k_t @ x.transpose(1, 2)) * strict
    rhs = s @ x.transpose(1, 2) + v.transpose(1, 2) @ kx  # [H, N_val, L]
    eye = torch.eye(L, dtype=r.dtype, device=r.device)
    # c (I - G) = rhs, (I - G) unit upper triangular: solve the transposed, lower system
    c = torch.linalg.solve_triangular((eye - g).transpose(1, 2), rhs.transpose(1, 2), upper=False,
                                      unitriangular=True).transpose(1, 2)  # [H, N_val, L]
    gb = (beta_t @ r_hat.transpose(1, 2)) * upto
    kb = (k_t @ r_hat.transpose(1, 2)) * upto
    y = s @ r_hat.transpose(1, 2) + c @ gb + v.transpose(1, 2) @ kb  # [H, N_val, L]
    last = decay_in[:, -1:, :]  # L_L [H, 1, N]
    s = s * last + c @ (beta_t * last) + v.transpose(1, 2) @ (k_t * last)
    return y.permute(2, 0, 1).contiguous(), s


RECURRENCE = wkv7  # the torch recurrence; the runner may swap in a kernel with the same signature (ctx)
KERNEL = "wkv7"  # its counterpart in rwkv_convert.cuda.ops and cpu.ops


def time_mix(lw: dict, x: torch.Tensor, state: list, ctx: dict) -> torch.Tensor:
    T, H, C = x.shape[0], state[1].shape[0], x.shape[1]
    sx = shifted(x, state[0]) - x
    xr, xw, xk, xv, xa, xg = (x + sx * lw["att.x_mix"]).unbind(0)

    p = project(lw, {"att.receptance.weight": xr, "att.key.weight": xk, "att.value.weight": xv})
    r, k, v = p["att.receptance.weight"], p["att.key.weight"], p["att.value.weight"]
    w = lora_product(torch.tanh(lora_product(xw, lw["att.w1"])), lw["att.w2"])
    a = torch.sigmoid(lw["att.a0"] + lora_product(lora_product(xa, lw["att.a1"]), lw["att.a2"]))
    g = lora_product(torch.sigmoid(lora_product(xg, lw["att.g1"])), lw["att.g2"])

    kk = F.normalize((k * lw["att.k_k"]).view(T, H, -1), dim=-1, p=2.0, eps=1e-12).view(T, C)
    k = k * (1 + (a - 1) * lw["att.k_a"])
    if "v_first" not in ctx:
        ctx["v_first"] = v
    else:
        v = v + (ctx["v_first"].to(v) - v) * torch.sigmoid(lw["att.v0"] + lora_product(lora_product(xv, lw["att.v1"]),
                                                                                         lw["att.v2"]))
    w = torch.exp(-DECAY_SCALE * torch.sigmoid((lw["att.w0"] + w).float()))

    r, k, v = (t.float().view(T, H, -1) for t in (r, k, v))
    recurrence = ctx.get("recurrence", wkv7)
    y, state[1] = recurrence(r, w.view(T, H, -1), k, v, kk.float().view(T, H, -1), a.float().view(T, H, -1), state[1])
    y = group_norm(y.view(T, C).to(x.dtype), H, lw["att.ln_x.weight"], lw["att.ln_x.bias"])
    bonus = (r * k * lw["att.r_k"]).sum(-1, keepdim=True) * v
    y = y + bonus.view(T, C).to(y.dtype)
    return linear(y * g, lw["att.output.weight"])


def channel_mix(lw: dict, x: torch.Tensor, last: torch.Tensor, ctx: dict) -> torch.Tensor:
    k = x + (shifted(x, last) - x) * lw["ffn.x_k"]
    k = torch.relu(linear(k, lw["ffn.key.weight"])) ** 2
    if "ffn.s1" in lw:  # DeepEmbed: each token's 32x32 matrix modulates the hidden units
        T, r = x.shape[0], lw["ffn.s1"].shape[1]
        table = token_rows(lw, "ffn.s_emb.weight", ctx["ids"], ctx).to(x.dtype).view(T, r, r)
        ss = ((x @ lw["ffn.s1"].to(x.dtype)).unsqueeze(1) @ table).squeeze(1)
        k = k * (ss @ lw["ffn.s2"].to(x.dtype) + lw["ffn.s0"].to(x.dtype))
    return linear(k, lw["ffn.value.weight"])


def dea_attention(lw: dict, x: torch.Tensor, state: list, ctx: dict) -> torch.Tensor:
    """DEA ("7b"): causal softmax attention over the whole context, from the layer's input residual x. The
    state holds each token's 32-wide key and value pre-projections, so keys and values of every position are
    rebuilt from them (with the token-indexed scales) at each call; fp32 throughout."""
    T, xf = x.shape[0], x.float()
    k_cache = torch.cat((state[3], xf @ lw["qkv.k1"]))
    v_cache = torch.cat((state[4], xf @ lw["qkv.v1"]))
    context = ctx["context_ids"]
    n = context.shape[0]
    q = xf @ lw["qkv.qq.weight"].t()
    k = (k_cache @ lw["qkv.k2"]) * token_rows(lw, "qkv.k_emb.weight", context, ctx)
    v = torch.tanh(v_cache @ lw["qkv.v2"]) * token_rows(lw, "qkv.v_emb.weight", context, ctx)
    q_mixed = q + (shifted(q, state[5]) - q) * lw["qkv.x_q"]
    zero_k, zero_v = k.new_zeros(k.shape[1]), v.new_zeros(v.shape[1])
    k = k + (shifted(k, zero_k) - k) * lw["qkv.x_k"]  # shifted along the whole context, zero before token 0
    v = v + (shifted(v, zero_v) - v) * lw["qkv.x_v"]
    q_mixed = layer_norm(q_mixed, lw["qkv.lnq.weight"], lw["qkv.lnq.bias"])
    k = layer_norm(k, lw["qkv.lnk.weight"], lw["qkv.lnk.bias"])
    v = layer_norm(v, lw["qkv.lnv.weight"], lw["qkv.lnv.bias"])
    out = torch.empty(T, v.shape[1], dtype=torch.float32, device=x.device)
    key_positions = torch.arange(n, device=x.device).unsqueeze(0)
    for start in range(0, T, DEA_QUERY_BLOCK):  # scores for a block of queries at a time: memory linear in n
        stop = min(start + DEA_QUERY_BLOCK, T)
        scores = 64 * torch.tanh((q_mixed[start:stop] @ k.t()) / 1024)  # soft cap
        positions = torch.arange(n - T + start, n - T + stop, device=x.device).unsqueeze(1)
        scores = scores.masked_fill(key_positions > positions, float("-inf"))  # causal
        out[start:stop] = torch.softmax(scores, dim=-1) @ v
    state[3], state[4], state[5] = k_cache, v_cache, q[-1]
    return out.to(x.dtype)


def layer_forward(lw: dict, x: torch.Tensor, state: list, ctx: dict) -> torch.Tensor:
    """x += att(LN1 x) [+ DEA(x)]; x += ffn(LN2 x). state[0] and state[2] are the token-shift states."""
    xx = layer_norm(x, lw["ln1.weight"], lw["ln1.bias"])
    att = time_mix(lw, xx, state, ctx)
    if "qkv.qq.weight" in lw:
        att = att + dea_attention(lw, x, state, ctx)
    x = x + att
    state[0] = xx[-1]
    xx = layer_norm(x, lw["ln2.weight"], lw["ln2.bias"])
    x = x + channel_mix(lw, xx, state[2], ctx)
    state[2] = xx[-1]
    return x

