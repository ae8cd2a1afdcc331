"""onnxruntime's MatMulNBits blocks chosen by our quantizer: 4 or 8 bits per weight in blocks of 32 along a
row (the matrix's input dimension), each block a scale (the activations' dtype, fp32 or fp16) and an unsigned
integer zero point, value = scale * (q - zero_point), q in [0, 2^bits - 1]. onnxruntime's own packer sets the
block's range from its minimum and maximum; here the scale and zero point are the importance-weighted least
squares fit of gguf_blocks' search, and GPTQ (quant/gptq.py) can round the values on that grid.

Packing (as onnxruntime reads it): per row, blocks in order, each block's 32 levels as bytes (4 bits: value 2i
in the low nibble of byte i, 2i+1 in the high one); zero points per row, one byte each (8 bits) or two to a byte
(4 bits, even blocks in the low nibble)."""

from __future__ import annotations

import numpy as np

from .gguf_blocks import Codec, Grid, affine_search, as_blocks

BLOCK = 32
SCALE_DTYPES = {"fp32": np.float32, "fp16": np.float16}
REFIT = 2  # rounds of: levels for the scale, then the weighted least-squares scale for those levels


def codec_name(bits: int, scale_dtype: str) -> str:
    return f"nbits{bits}-{scale_dtype}"


def _fit(x: np.ndarray, w: np.ndarray, bits: int, dtype) -> tuple[np.ndarray, np.ndarray]:
    """Per block (rows of x): (scale [n, 1] in dtype, zero point [n, 1] uint8) minimising sum w (x - s (q - z))^2
    over what the search tries. The zero point is an integer level, so zero always lies on the grid."""
    nmax = (1 << bits) - 1
    d, m = affine_search(x, w, nmax, offset_at_most_zero=True)  # x ~ d q + m with m <= 0
    with np.errstate(divide="ignore", invalid="ignore"):
        zp = np.where(d > 0, np.clip(np.rint(-m / d), 0, nmax), 0)
        for _ in range(REFIT):
            q = np.where(d > 0, np.clip(np.rint(x / d + zp), 0, nmax), zp) - zp
            sqq, sqx = (w * q * q).sum(-1, keepdims=True), (w * q * x).sum(-1, keepdims=True)
            d = np.where(sqq > 0, sqx / sqq, d)
    constant = (x.max(-1, keepdims=True) == x.min(-1, keepdims=True))  # one value: reach it exactly at an end
    top = x[:, :1]
    d = np.where(constant, np.abs(top) / nmax, d)
    zp = np.where(constant, np.where(top < 0, nmax, 0), zp)
    return np.maximum(d, 0).astype(dtype), zp.astype(np.uint8)


def _grid(params, nmax: int) -> Grid:
    scale, zp = params
    step = np.repeat(scale.astype(np.float32), BLOCK, -1)
    return Grid(step, -step * np.repeat(zp.astype(np.float32), BLOCK, -1), 0, nmax)


def level_bytes(q: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned levels [..., values] as onnxruntime's block-quantized ops read them: one byte each (8 bits), or
    two to a byte (4 bits: value 2i in the low nibble of byte i, 2i+1 in the high one)."""
    q = q.astype(np.uint8)
    return (q[..., 0::2] & 0x0F) | (q[..., 1::2] << 4) if bits == 4 else q


def _pack(params, q: np.ndarray, bits: int) -> np.ndarray:
    """One record per block: the scale's bytes, the zero point's byte, the levels' bytes (see unpack)."""
    scale, zp = params
    data = level_bytes(q, bits)
    return np.concatenate([np.ascontiguousarray(scale).view(np.uint8), zp, data], axis=-1)


def codec(bits: int, scale_dtype: str) -> Codec:
    dtype, nmax = SCALE_DTYPES[scale_dtype], (1 << bits) - 1
    return Codec(BLOCK, lambda x, w: _fit(x, w, bits, dtype), lambda p: _grid(p, nmax), lambda p, q: _pack(p, q, bits))


CODECS = {codec_name(bits, s): codec(bits, s) for bits in (4, 8) for s in SCALE_DTYPES}


def unpack(records: np.ndarray, n: int, k: int, bits: int, scale_dtype: str):
    """Rows of block records (as CODECS' pack writes them, [n, k / 32 * record]) -> MatMulNBits' inputs: data
    uint8 [n, k / 32, 32 * bits / 8], scales [n, k / 32] (the scale dtype), zero points uint8 [n, z]."""
    dtype = SCALE_DTYPES[scale_dtype]
    width = np.dtype(dtype).itemsize
    blocks = k // BLOCK
    r = np.ascontiguousarray(records, dtype=np.uint8).reshape(n, blocks, -1)
    scales = np.ascontiguousarray(r[:, :, :width]).view(dtype).reshape(n, blocks)
    zp = r[:, :, width]
    data = np.ascontiguousarray(r[:, :, width + 1:])
    if bits == 4:
        padded = np.zeros((n, blocks + blocks % 2), np.uint8)
        padded[:, :blocks] = zp
        zp = padded[:, 0::2] | (padded[:, 1::2] << 4)
    return data, scales, np.ascontiguousarray(zp)


def quantize(rows: np.ndarray, bits: int, scale_dtype: str, importance: np.ndarray | None = None):
    """rows [n, k] (k a multiple of 32) -> MatMulNBits' (data, scales, zero points), each block fit by the
    importance-weighted search (importance [k] per column, or None: all equal)."""
    c = CODECS[codec_name(bits, scale_dtype)]
    n, blocks, wb = as_blocks(rows, importance, BLOCK, "blocks")
    params = c.fit(blocks, wb)
    records = c.pack(params, c.grid(params).levels(blocks)).reshape(n, -1)
    return unpack(records, n, rows.shape[1], bits, scale_dtype)


def dequantize(data: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, bits: int, k: int) -> np.ndarray:
    """MatMulNBits' inputs back to the [n, k] fp32 matrix they hold (as onnxruntime computes it)."""
    n, blocks = scales.shape
    if bits == 4:
        q = np.stack([data & 0x0F, data >> 4], axis=-1).reshape(n, blocks, BLOCK)
        zp = np.stack([zero_points & 0x0F, zero_points >> 4], axis=-1).reshape(n, -1)[:, :blocks]
    else:
        q, zp = data.reshape(n, blocks, BLOCK), zero_points[:, :blocks]
    values = (q.astype(np.float32) - zp[:, :, None].astype(np.float32)) * scales[:, :, None].astype(np.float32)
    return values.reshape(n, blocks * BLOCK)[:, :k]
