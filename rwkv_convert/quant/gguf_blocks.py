"""GGUF's 32-value block types (Q8_0, Q5_0, Q5_1, Q4_0, Q4_1) quantized with importance weights.

The blocks are bit for bit the ones llama.cpp reads (the same packing as gguf-py's quantizers); only the
choice of each block's scale (and minimum) differs: instead of the largest value mapping to the largest
level, a search over candidate scales keeps the one with the least importance-weighted squared error,
sum_i w_i (x_i - d q_i)^2, where w_i is the mean square of the activation that meets weight column i on a
calibration text (what llama.cpp's importance matrix holds). With equal importance it still beats the plain
rule: the largest value is not the one that matters most to the error."""

from __future__ import annotations

import numpy as np

BLOCK = 32
SYMMETRIC = {"q8_0": 128, "q5_0": 16, "q4_0": 8}  # levels -n..n-1 (q8_0: -127..127, as gguf-py writes it)
AFFINE = {"q5_1": 31, "q4_1": 15}  # levels 0..n
TYPES = tuple(SYMMETRIC) + tuple(AFFINE)
STEPS = np.arange(-9, 10) * 0.1  # llama.cpp's make_qx_quants tries the same 19 scale offsets
REFINE = 3  # rounds of alternating refinement after the search


def _symmetric(x: np.ndarray, w: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Per block (rows of x): the scale d and levels q in [-nmax, nmax - 1] minimising sum w (x - d q)^2."""
    lo, hi = (-127, 127) if nmax == 128 else (-nmax, nmax - 1)
    top = np.take_along_axis(x, np.abs(x).argmax(-1)[:, None], -1)  # the signed value of largest magnitude
    best_d = np.zeros((x.shape[0], 1), np.float32)
    best_score = np.full((x.shape[0], 1), -np.inf, np.float32)
    sign = 1.0 if nmax == 128 else -1.0  # gguf-py maps the largest value to -nmax (q8_0: to +127)
    levels = 127.0 if nmax == 128 else float(nmax)
    with np.errstate(divide="ignore", invalid="ignore"):
        for step in STEPS:
            iscale = np.where(top == 0, 0, sign * (levels + step) / top)
            q = np.clip(np.rint(x * iscale), lo, hi)
            sumlx = (w * x * q).sum(-1, keepdims=True)
            suml2 = (w * q * q).sum(-1, keepdims=True)
            score = np.where(suml2 > 0, sumlx * sumlx / suml2, -np.inf)  # the error saved by the best scale
            better = score > best_score
            best_score = np.where(better, score, best_score)
            best_d = np.where(better, np.where(suml2 > 0, sumlx / suml2, 0), best_d)
        for _ in range(REFINE):  # alternate: nearest levels for the scale, then the best scale for the levels
            q = np.where(best_d == 0, 0, np.clip(np.rint(x / best_d), lo, hi))
            sumlx, suml2 = (w * x * q).sum(-1, keepdims=True), (w * q * q).sum(-1, keepdims=True)
            score = np.where(suml2 > 0, sumlx * sumlx / suml2, -np.inf)
            better = score > best_score
            best_score = np.where(better, score, best_score)
            best_d = np.where(better, np.where(suml2 > 0, sumlx / suml2, 0), best_d)
    d16 = best_d.astype(np.float16)
    # the levels again for the scale as stored (fp16), so that each value rounds to its nearest level
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(d16 == 0, 0, np.clip(np.rint(x / d16.astype(np.float32)), lo, hi)).astype(np.int8)
    return d16, q


def symmetric_blocks(rows: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """rows [n, k] in blocks of 32 along k -> (scales [n, k / 32] float32, levels [n, k] int8 in
    [-2^(bits-1), 2^(bits-1) - 1]), each block's scale found by the search (all columns equal)."""
    n, k = rows.shape
    blocks = np.ascontiguousarray(rows, dtype=np.float32).reshape(-1, BLOCK)
    d, q = _symmetric(blocks, np.ones_like(blocks), 1 << (bits - 1))
    return d.astype(np.float32).reshape(n, k // BLOCK), q.reshape(n, k)


def _affine_search(x: np.ndarray, w: np.ndarray, nmax: int, offset_at_most_zero: bool = False):
    """Per block: scale d and offset m with x ~ d q + m, q in [0, nmax], minimising sum w (x - (d q + m))^2
    (weighted least squares for d and m given the levels, over candidate level assignments). With
    offset_at_most_zero (the K-quants store -m as an unsigned multiple of dmin): m <= 0 and d >= 0."""
    lo = x.min(-1, keepdims=True)
    if offset_at_most_zero:
        lo = np.minimum(lo, 0)
    span = x.max(-1, keepdims=True) - lo
    best_err = np.full_like(lo, np.inf)
    best_d, best_m = (span / nmax).astype(np.float32), lo.astype(np.float32)
    sw = w.sum(-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        for step in np.concatenate([[0.0], STEPS]):
            iscale = np.where(span == 0, 0, (nmax + step) / span)
            q = np.clip(np.rint((x - lo) * iscale), 0, nmax)
            sq, sqq = (w * q).sum(-1, keepdims=True), (w * q * q).sum(-1, keepdims=True)
            sx, sqx = (w * x).sum(-1, keepdims=True), (w * q * x).sum(-1, keepdims=True)
            det = sw * sqq - sq * sq
            d = np.where(det > 0, (sw * sqx - sq * sx) / det, best_d)
            m = np.where(det > 0, (sqq * sx - sq * sqx) / det, best_m)
            if offset_at_most_zero:
                positive = m > 0  # an offset above zero cannot be stored: refit the scale with offset 0
                d = np.maximum(np.where(positive, np.where(sqq > 0, sqx / sqq, 0), d), 0)
                m = np.where(positive, 0, m)
            err = (w * (x - (d * q + m)) ** 2).sum(-1, keepdims=True)
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best_d, best_m = np.where(better, d, best_d), np.where(better, m, best_m)
    return best_d, best_m


def _affine(x: np.ndarray, w: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_1 / Q5_1 blocks: d, m (fp16) and levels q in [0, nmax] for the scale and offset as stored."""
    d, m = _affine_search(x, w, nmax)
    d16, m16 = d.astype(np.float16), m.astype(np.float16)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(d16 == 0, 0, np.clip(np.rint((x - m16.astype(np.float32)) / d16.astype(np.float32)), 0, nmax))
    return d16, m16, q.astype(np.uint8)


def _nibbles(q: np.ndarray) -> np.ndarray:  # 32 levels -> 16 bytes: values 0-15 low nibbles, 16-31 high
    q = q.astype(np.uint8).reshape(q.shape[0], 2, BLOCK // 2)
    return (q[:, 0] & 0x0F) | (q[:, 1] << 4)


def _high_bits(q: np.ndarray) -> np.ndarray:  # bit 4 of each of the 32 levels, as a little-endian uint32
    return np.packbits((q.astype(np.uint8) >> 4).reshape(q.shape[0], 1, BLOCK), axis=-1,
                       bitorder="little").reshape(q.shape[0], 4)


def _as_blocks(rows: np.ndarray, importance: np.ndarray | None, size: int, unit: str):
    """(n rows, the values as [n * k / size, size] blocks, each value's importance in the same shape)."""
    x = np.ascontiguousarray(rows, dtype=np.float32)
    n, k = x.shape
    if k % size:
        raise ValueError(f"rows of {k} values are not whole {unit} of {size}")
    w = np.ones(k, np.float32) if importance is None else np.asarray(importance, np.float32)
    if w.shape != (k,):
        raise ValueError(f"importance has shape {w.shape}, expected ({k},)")
    w = np.maximum(w, w.max() * 1e-6 if w.max() > 0 else 1.0)  # no column counts for nothing
    blocks = x.reshape(-1, size)
    return n, blocks, np.broadcast_to(w.reshape(1, -1, size), (n, k // size, size)).reshape(-1, size)


def quantize(rows: np.ndarray, qtype: str, importance: np.ndarray | None = None) -> np.ndarray:
    """rows [n, k] (k a multiple of 32) -> the GGUF blocks as uint8 [n, k / 32 * block bytes].
    importance: [k] per column (or None: all equal)."""
    n, blocks, wb = _as_blocks(rows, importance, BLOCK, "blocks")
    if qtype in SYMMETRIC:
        d, q = _symmetric(blocks, wb, SYMMETRIC[qtype])
        if qtype == "q8_0":
            parts = [d.view(np.uint8), q.view(np.uint8)]
        elif qtype == "q4_0":
            parts = [d.view(np.uint8), _nibbles(q + 8)]
        else:
            u = (q + 16).astype(np.uint8)
            parts = [d.view(np.uint8), _high_bits(u), _nibbles(u)]
    elif qtype in AFFINE:
        d, m, q = _affine(blocks, wb, AFFINE[qtype])
        parts = [d.view(np.uint8), m.view(np.uint8)] + ([_high_bits(q)] if qtype == "q5_1" else []) + [_nibbles(q)]
    else:
        raise ValueError(f"no importance-weighted quantizer for {qtype}; choose from {', '.join(TYPES)}")
    return np.concatenate(parts, axis=-1).reshape(n, -1)


# ---- K-quants: super-blocks of 256 values ----------------------------------------------------------------
SUPER = 256
K_TYPES = ("q6_k", "q5_k", "q4_k")
K_FALLBACK = {"q6_k": "q8_0", "q5_k": "q5_1", "q4_k": "q5_0"}  # llama.cpp's choice for rows not of 256s


def _pack_scale_min(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins per super-block into the 12 bytes Q4_K/Q5_K keep them in."""
    sc, mn = sc.astype(np.uint8), mn.astype(np.uint8)
    out = np.empty((sc.shape[0], 12), np.uint8)
    out[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    return out


def _k_affine(x: np.ndarray, w: np.ndarray, nmax: int):
    """Q4_K / Q5_K: x [n, 256] -> d, dmin (fp16 [n, 1]), 6-bit scales and mins [n, 8], levels [n, 256]."""
    n = x.shape[0]
    xs, ws = x.reshape(n * 8, 32), w.reshape(n * 8, 32)
    scale, offset = _affine_search(xs, ws, nmax, offset_at_most_zero=True)
    scale, mins = scale.reshape(n, 8), (-offset).reshape(n, 8)
    d = (scale.max(-1, keepdims=True) / 63).astype(np.float16)
    dmin = (mins.max(-1, keepdims=True) / 63).astype(np.float16)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d == 0, 0, np.clip(np.rint(scale / d.astype(np.float32)), 0, 63))
        mn = np.where(dmin == 0, 0, np.clip(np.rint(mins / dmin.astype(np.float32)), 0, 63))
        step = (d.astype(np.float32) * sc)[..., None]  # [n, 8, 1]
        low = (dmin.astype(np.float32) * mn)[..., None]
        q = np.where(step == 0, 0, np.clip(np.rint((x.reshape(n, 8, 32) + low) / step), 0, nmax))
    return d, dmin, sc, mn, q.reshape(n, SUPER).astype(np.uint8)


def _k_nibbles(q: np.ndarray) -> np.ndarray:  # sub-blocks 2c and 2c+1 share 32 bytes: low and high nibbles
    q = q.reshape(q.shape[0], 4, 2, 32)
    return ((q[:, :, 0] & 0x0F) | ((q[:, :, 1] & 0x0F) << 4)).reshape(q.shape[0], 128)


def _q6_k(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    n = x.shape[0]
    xs, ws = x.reshape(n * 16, 16), w.reshape(n * 16, 16)
    scale, _ = _symmetric(xs, ws, 32)  # per 16 values: a scale for levels -32..31
    scale = scale.astype(np.float32).reshape(n, 16)
    top = np.take_along_axis(scale, np.abs(scale).argmax(-1)[:, None], -1)
    d = (top / -128).astype(np.float16)  # int8 scales: the largest maps to -128, as llama.cpp does
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d == 0, 0, np.clip(np.rint(scale / d.astype(np.float32)), -128, 127))
        step = (d.astype(np.float32) * sc)[..., None]
        q = np.where(step == 0, 0, np.clip(np.rint(x.reshape(n, 16, 16) / step), -32, 31)) + 32
    q = q.reshape(n, 2, 4, 32).astype(np.uint8)  # [half, t, i]: value (half * 4 + t) * 32 + i
    ql = np.empty((n, 2, 2, 32), np.uint8)  # [half, c, i]: low nibble row t = c, high nibble row t = c + 2
    ql[:, :, 0] = (q[:, :, 0] & 0x0F) | ((q[:, :, 2] & 0x0F) << 4)
    ql[:, :, 1] = (q[:, :, 1] & 0x0F) | ((q[:, :, 3] & 0x0F) << 4)
    qh = ((q[:, :, 0] >> 4) | ((q[:, :, 1] >> 4) << 2) | ((q[:, :, 2] >> 4) << 4) | ((q[:, :, 3] >> 4) << 6))
    return np.concatenate([ql.reshape(n, 128), qh.reshape(n, 64), sc.astype(np.int8).view(np.uint8),
                           d.view(np.uint8)], axis=-1)


def quantize_k(rows: np.ndarray, qtype: str, importance: np.ndarray | None = None) -> np.ndarray:
    """rows [n, k] (k a multiple of 256) -> Q6_K / Q5_K / Q4_K super-blocks as uint8 [n, k / 256 * bytes]."""
    n, blocks, wb = _as_blocks(rows, importance, SUPER, "super-blocks")
    if qtype == "q6_k":
        out = _q6_k(blocks, wb)
    elif qtype in ("q5_k", "q4_k"):
        d, dmin, sc, mn, q = _k_affine(blocks, wb, 31 if qtype == "q5_k" else 15)
        parts = [d.view(np.uint8), dmin.view(np.uint8), _pack_scale_min(sc, mn)]
        if qtype == "q5_k":  # bit j of byte i: the high bit of value i of sub-block j
            high = (q >> 4).reshape(-1, 8, 32)
            parts.append(np.bitwise_or.reduce(high << np.arange(8, dtype=np.uint8)[None, :, None], axis=1))
        parts.append(_k_nibbles(q))
        out = np.concatenate(parts, axis=-1)
    else:
        raise ValueError(f"no K-quant quantizer for {qtype}; choose from {', '.join(K_TYPES)}")
    return out.reshape(n, -1)


def quantize_any(rows: np.ndarray, qtype: str, importance: np.ndarray | None = None) -> np.ndarray:
    """Our quantizer for any type this module writes: the K-quants or the 32-value blocks."""
    return (quantize_k if qtype in K_TYPES else quantize)(rows, qtype, importance)
