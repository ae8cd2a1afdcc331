"""GGUF's 32-value block types (Q8_0, Q5_0, Q5_1, Q4_0, Q4_1) quantized with importance weights.

The blocks are bit for bit the ones llama.cpp reads (the same packing as gguf-py's quantizers); only the
choice of each block's scale (and minimum) differs: instead of the largest value mapping to the largest
level, a search over candidate scales keeps the one with the least importance-weighted squared error,
sum_i w_i (x_i - d q_i)^2, where w_i is the mean square of the activation that meets weight column i on a
calibration text (what llama.cpp's importance matrix holds). With equal importance it still beats the plain
rule: the largest value is not the one that matters most to the error."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

BLOCK = 32
SYMMETRIC = {"q8_0": 128, "q5_0": 16, "q4_0": 8}  # levels -n..n-1 (q8_0: -127..127, as gguf-py writes it)
AFFINE = {"q5_1": 31, "q4_1": 15}  # levels 0..n
TYPES = tuple(SYMMETRIC) + tuple(AFFINE)
STEPS = np.arange(-9, 10) * 0.1  # llama.cpp's make_qx_quants tries the same 19 scale offsets
REFINE = 3  # rounds of alternating refinement after the search


@dataclass(frozen=True)
class Grid:
    """The values a block type can store at each position, once its scales are chosen: step * q + offset for
    an integer q in [lo, hi] (step and offset: one per value, [blocks, values])."""
    step: np.ndarray
    offset: np.ndarray
    lo: int
    hi: int

    def levels(self, x: np.ndarray, column: slice | int = slice(None)) -> np.ndarray:
        """The level nearest each value of x (values at positions `column` of the blocks); 0 where step is 0."""
        step, offset = self.step[:, column], self.offset[:, column]
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(step == 0, 0, np.clip(np.rint((x - offset) / step), self.lo, self.hi))

    def values(self, q: np.ndarray, column: slice | int = slice(None)) -> np.ndarray:
        return self.step[:, column] * q + self.offset[:, column]


def _grid(step: np.ndarray, offset, size: int, lo: int, hi: int) -> Grid:
    """A grid from per-sub-block steps and offsets ([blocks, sub-blocks]) repeated over their values."""
    n, parts = step.shape
    expand = lambda a: np.repeat(np.broadcast_to(np.asarray(a, np.float32), (n, parts)), size // parts, -1)  # noqa: E731
    return Grid(expand(step), expand(offset), lo, hi)


def _symmetric_range(nmax: int) -> tuple[int, int]:
    return (-127, 127) if nmax == 128 else (-nmax, nmax - 1)


def _symmetric_scale(x: np.ndarray, w: np.ndarray, nmax: int) -> np.ndarray:
    """Per block (rows of x): the scale d, fp16 as stored, for levels in [-nmax, nmax - 1] (q8_0: -127..127)
    minimising sum w (x - d q)^2."""
    lo, hi = _symmetric_range(nmax)
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
    return best_d.astype(np.float16)


def symmetric_blocks(rows: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """rows [n, k] in blocks of 32 along k -> (scales [n, k / 32] float32, levels [n, k] int8 in
    [-2^(bits-1), 2^(bits-1) - 1]), each block's scale found by the search (all columns equal)."""
    n, k = rows.shape
    blocks = np.ascontiguousarray(rows, dtype=np.float32).reshape(-1, BLOCK)
    nmax = 1 << (bits - 1)
    d = _symmetric_scale(blocks, np.ones_like(blocks), nmax)
    q = _grid(d, 0, BLOCK, *_symmetric_range(nmax)).levels(blocks).astype(np.int8)
    return d.astype(np.float32).reshape(n, k // BLOCK), q.reshape(n, k)


def affine_search(x: np.ndarray, w: np.ndarray, nmax: int, offset_at_most_zero: bool = False):
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


def _nibbles(q: np.ndarray) -> np.ndarray:  # 32 levels -> 16 bytes: values 0-15 low nibbles, 16-31 high
    q = q.astype(np.uint8).reshape(q.shape[0], 2, BLOCK // 2)
    return (q[:, 0] & 0x0F) | (q[:, 1] << 4)


def _high_bits(q: np.ndarray) -> np.ndarray:  # bit 4 of each of the 32 levels, as a little-endian uint32
    return np.packbits((q.astype(np.uint8) >> 4).reshape(q.shape[0], 1, BLOCK), axis=-1,
                       bitorder="little").reshape(q.shape[0], 4)


def column_importance(importance: np.ndarray | None, k: int) -> np.ndarray:
    """Per-column weights [k] for the error: the importance given (or all equal), floored so that no column
    counts for nothing."""
    w = np.ones(k, np.float32) if importance is None else np.asarray(importance, np.float32)
    if w.shape != (k,):
        raise ValueError(f"importance has shape {w.shape}, expected ({k},)")
    return np.maximum(w, w.max() * 1e-6 if w.max() > 0 else 1.0)


def as_blocks(rows: np.ndarray, importance: np.ndarray | None, size: int, unit: str):
    """(n rows, the values as [n * k / size, size] blocks, each value's importance in the same shape)."""
    x = np.ascontiguousarray(rows, dtype=np.float32)
    n, k = x.shape
    if k % size:
        raise ValueError(f"rows of {k} values are not whole {unit} of {size}")
    w = column_importance(importance, k)
    blocks = x.reshape(-1, size)
    return n, blocks, np.broadcast_to(w.reshape(1, -1, size), (n, k // size, size)).reshape(-1, size)


# ---- K-quants: super-blocks of 256 values ----------------------------------------------------------------
SUPER = 256
K_TYPES = ("q6_k", "q5_k", "q4_k", "q3_k", "q2_k")
# llama.cpp's choice for rows not of 256s
K_FALLBACK = {"q6_k": "q8_0", "q5_k": "q5_1", "q4_k": "q5_0", "q3_k": "q4_0", "q2_k": "q4_0"}


def _pack_scale_min(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins per super-block into the 12 bytes Q4_K/Q5_K keep them in."""
    sc, mn = sc.astype(np.uint8), mn.astype(np.uint8)
    out = np.empty((sc.shape[0], 12), np.uint8)
    out[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    return out


def _super_affine_fit(x: np.ndarray, w: np.ndarray, nmax: int, sub: int, scale_max: int):
    """The affine K-quants: x [n, 256] in sub-blocks of `sub` values -> d, dmin (fp16 [n, 1]) and each
    sub-block's scale and min as integers 0..scale_max [n, 256 / sub], for x ~ d sc q - dmin mn, q in 0..nmax."""
    n, parts = x.shape[0], SUPER // sub
    scale, offset = affine_search(x.reshape(n * parts, sub), w.reshape(n * parts, sub), nmax,
                                  offset_at_most_zero=True)
    scale, mins = scale.reshape(n, parts), (-offset).reshape(n, parts)
    d = (scale.max(-1, keepdims=True) / scale_max).astype(np.float16)
    dmin = (mins.max(-1, keepdims=True) / scale_max).astype(np.float16)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d == 0, 0, np.clip(np.rint(scale / d.astype(np.float32)), 0, scale_max))
        mn = np.where(dmin == 0, 0, np.clip(np.rint(mins / dmin.astype(np.float32)), 0, scale_max))
    return d, dmin, sc, mn


def _k_affine_fit(x: np.ndarray, w: np.ndarray, nmax: int):
    """Q4_K / Q5_K: 8 sub-blocks of 32, 6-bit scales and mins."""
    return _super_affine_fit(x, w, nmax, 32, 63)


def _k_affine_grid(params, nmax: int) -> Grid:
    d, dmin, sc, mn = params
    return _grid(d.astype(np.float32) * sc, -(dmin.astype(np.float32) * mn), SUPER, 0, nmax)


def _k_affine_pack(params, q: np.ndarray, nmax: int) -> np.ndarray:
    d, dmin, sc, mn = params
    q = q.astype(np.uint8)
    parts = [d.view(np.uint8), dmin.view(np.uint8), _pack_scale_min(sc, mn)]
    if nmax == 31:  # q5_k: bit j of byte i is the high bit of value i of sub-block j
        high = (q >> 4).reshape(-1, 8, 32)
        parts.append(np.bitwise_or.reduce(high << np.arange(8, dtype=np.uint8)[None, :, None], axis=1))
    return np.concatenate(parts + [_k_nibbles(q)], axis=-1)


def _k_nibbles(q: np.ndarray) -> np.ndarray:  # sub-blocks 2c and 2c+1 share 32 bytes: low and high nibbles
    q = q.reshape(q.shape[0], 4, 2, 32)
    return ((q[:, :, 0] & 0x0F) | ((q[:, :, 1] & 0x0F) << 4)).reshape(q.shape[0], 128)


def _symmetric_k_fit(x: np.ndarray, w: np.ndarray, nmax: int, scale_bits: int):
    """Q6_K / Q3_K: x [n, 256] -> d (fp16 [n, 1]) and a signed `scale_bits`-bit scale per 16 values [n, 16] for
    levels -nmax..nmax-1; the largest sub-block scale maps to the most negative stored scale, as llama.cpp does."""
    n = x.shape[0]
    scale = _symmetric_scale(x.reshape(n * 16, 16), w.reshape(n * 16, 16), nmax).astype(np.float32).reshape(n, 16)
    top = np.take_along_axis(scale, np.abs(scale).argmax(-1)[:, None], -1)
    lowest = -(1 << (scale_bits - 1))
    d = (top / lowest).astype(np.float16)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d == 0, 0, np.clip(np.rint(scale / d.astype(np.float32)), lowest, -lowest - 1))
    return d, sc


def _q6_k_fit(x: np.ndarray, w: np.ndarray):
    """Q6_K: int8 scales per 16 values, levels -32..31."""
    return _symmetric_k_fit(x, w, 32, 8)


def _q6_k_pack(params, q: np.ndarray) -> np.ndarray:
    d, sc = params
    n = q.shape[0]
    q = (q + 32).reshape(n, 2, 4, 32).astype(np.uint8)  # [half, t, i]: value (half * 4 + t) * 32 + i
    ql = np.empty((n, 2, 2, 32), np.uint8)  # [half, c, i]: low nibble row t = c, high nibble row t = c + 2
    ql[:, :, 0] = (q[:, :, 0] & 0x0F) | ((q[:, :, 2] & 0x0F) << 4)
    ql[:, :, 1] = (q[:, :, 1] & 0x0F) | ((q[:, :, 3] & 0x0F) << 4)
    qh = ((q[:, :, 0] >> 4) | ((q[:, :, 1] >> 4) << 2) | ((q[:, :, 2] >> 4) << 4) | ((q[:, :, 3] >> 4) << 6))
    return np.concatenate([ql.reshape(n, 128), qh.reshape(n, 64), sc.astype(np.int8).view(np.uint8),
                           d.view(np.uint8)], axis=-1)


# ---- 2-3 bit K-quants: 16 sub-blocks of 16 values per super-block --------------------------------------------
def _low_bits_k(q: np.ndarray) -> np.ndarray:
    """Q2_K / Q3_K's 64 bytes of 2-bit values: byte half*32 + i holds value half*128 + j*32 + i at bits 2j."""
    low = (q.astype(np.uint8) & 3).reshape(q.shape[0], 2, 4, 32)
    return np.bitwise_or.reduce(low << (2 * np.arange(4, dtype=np.uint8))[None, None, :, None], axis=2).reshape(
        q.shape[0], 64)


def _q3_k_fit(x: np.ndarray, w: np.ndarray):
    """Q3_K: 6-bit signed scales per 16 values, levels -4..3."""
    return _symmetric_k_fit(x, w, 4, 6)


def _q3_k_pack(params, q: np.ndarray) -> np.ndarray:
    d, sc = params
    n = q.shape[0]
    u = (q + 4).astype(np.uint8)  # 0..7: two low bits in qs, the third in hmask
    high = (u >> 2).reshape(n, 8, 32)  # [half * 4 + j, i]: bit half * 4 + j of hmask byte i
    hmask = np.bitwise_or.reduce(high << np.arange(8, dtype=np.uint8)[None, :, None], axis=1)
    stored = (sc + 32).astype(np.uint8)  # 0..63: low nibbles in bytes 0-7, the two high bits in bytes 8-11
    scales = np.zeros((n, 12), np.uint8)
    scales[:, :8] = (stored[:, :8] & 0x0F) | ((stored[:, 8:] & 0x0F) << 4)
    for s in range(16):
        scales[:, 8 + s % 4] |= (stored[:, s] >> 4) << (2 * (s // 4))
    return np.concatenate([hmask, _low_bits_k(u), scales, d.view(np.uint8)], axis=-1)


def _q2_k_fit(x: np.ndarray, w: np.ndarray):
    """Q2_K: 16 sub-blocks of 16, 4-bit scales and mins, levels 0..3."""
    return _super_affine_fit(x, w, 3, 16, 15)


def _q2_k_pack(params, q: np.ndarray) -> np.ndarray:
    d, dmin, sc, mn = params
    scales = sc.astype(np.uint8) | (mn.astype(np.uint8) << 4)
    return np.concatenate([scales, _low_bits_k(q), d.view(np.uint8), dmin.view(np.uint8)], axis=-1)


# ---- every type as three steps: choose the scales, round each value on their grid, pack ------------------
@dataclass(frozen=True)
class Codec:
    size: int  # values per block (32) or super-block (256)
    fit: Callable  # (blocks [n, size], importance [n, size]) -> the block's stored scales, as a tuple
    grid: Callable  # scales -> Grid over [n, size]
    pack: Callable  # (scales, levels [n, size]) -> the blocks' bytes [n, block bytes]


def _symmetric_codec(nmax: int, pack) -> Codec:
    lo, hi = _symmetric_range(nmax)
    return Codec(BLOCK, lambda x, w: (_symmetric_scale(x, w, nmax),),
                 lambda p: _grid(p[0].astype(np.float32), 0, BLOCK, lo, hi), lambda p, q: pack(p[0], q))


def _affine_fit(x: np.ndarray, w: np.ndarray, nmax: int):
    d, m = affine_search(x, w, nmax)
    return d.astype(np.float16), m.astype(np.float16)


def _affine_codec(nmax: int) -> Codec:
    def pack(p, q):
        d, m = p
        q = q.astype(np.uint8)
        return np.concatenate([d.view(np.uint8), m.view(np.uint8)] + ([_high_bits(q)] if nmax == 31 else [])
                              + [_nibbles(q)], axis=-1)
    return Codec(BLOCK, lambda x, w: _affine_fit(x, w, nmax),
                 lambda p: _grid(p[0].astype(np.float32), p[1].astype(np.float32), BLOCK, 0, nmax), pack)


def _k_codec(nmax: int) -> Codec:
    return Codec(SUPER, lambda x, w: _k_affine_fit(x, w, nmax), lambda p: _k_affine_grid(p, nmax),
                 lambda p, q: _k_affine_pack(p, q, nmax))


def _q5_0_pack(d, q):
    u = (q + 16).astype(np.uint8)
    return np.concatenate([d.view(np.uint8), _high_bits(u), _nibbles(u)], axis=-1)


def _q8_0_pack(d, q):
    return np.concatenate([d.view(np.uint8), q.astype(np.int8).view(np.uint8)], axis=-1)


CODECS = {
    "q8_0": _symmetric_codec(128, _q8_0_pack),
    "q5_0": _symmetric_codec(16, _q5_0_pack),
    "q4_0": _symmetric_codec(8, lambda d, q: np.concatenate([d.view(np.uint8), _nibbles(q + 8)], -1)),
    "q5_1": _affine_codec(31),
    "q4_1": _affine_codec(15),
    "q6_k": Codec(SUPER, _q6_k_fit, lambda p: _grid(p[0].astype(np.float32) * p[1], 0, SUPER, -32, 31), _q6_k_pack),
    "q5_k": _k_codec(31),
    "q4_k": _k_codec(15),
    "q3_k": Codec(SUPER, _q3_k_fit, lambda p: _grid(p[0].astype(np.float32) * p[1], 0, SUPER, -4, 3), _q3_k_pack),
    "q2_k": Codec(SUPER, _q2_k_fit,
                  lambda p: _grid(p[0].astype(np.float32) * p[2], -(p[1].astype(np.float32) * p[3]), SUPER, 0, 3),
                  _q2_k_pack),
}


def quantize_any(rows: np.ndarray, qtype: str, importance: np.ndarray | None = None) -> np.ndarray:
    """rows [n, k] -> the GGUF blocks of qtype (any type this module writes) as uint8 [n, k / size * bytes],
    each block's scales chosen by the importance-weighted search; importance: [k] per column, or None (equal).
    k must be a multiple of the type's block (32; 256 for the K-quants)."""
    if qtype not in CODECS:
        raise ValueError(f"no importance-weighted quantizer for {qtype}; choose from {', '.join(CODECS)}")
    codec = CODECS[qtype]
    n, blocks, wb = as_blocks(rows, importance, codec.size, "blocks" if codec.size == BLOCK else "super-blocks")
    scales = codec.fit(blocks, wb)
    return codec.pack(scales, codec.grid(scales).levels(blocks)).reshape(n, -1)


quantize = quantize_any
