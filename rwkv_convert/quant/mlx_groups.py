"""MLX's affine group quantization (mlx.core.quantize, "affine" mode), as mlx-lm stores quantized layers: along
each row of a [out, in] matrix, groups of `group_size` values, each a scale and a bias in the model's float
type, value = scale * q + bias with q in [0, 2^bits - 1]; the levels packed little-endian into uint32 words, a
row's levels one bit stream (value i at bits [i * bits, (i + 1) * bits)), for 2, 3, 4, 5, 6 and 8 bits.

`plain_fit` is MLX's own rule, bit for bit (tests/test_mlx.py checks it against mlx.core.quantize): the group's
range over the levels, turned so that the larger of |min| and |max| lies exactly on the grid, and zero too.
`codec` is the same storage with the scale and bias chosen by our importance-weighted least squares
(gguf_blocks.affine_search), for GPTQ (quant/gptq.py) to round on: standard groups that stock mlx-lm loads."""

from __future__ import annotations

import numpy as np
import torch

from .gguf_blocks import Codec, Grid, affine_search, column_importance

BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)
EPS = np.float32(1e-7)  # MLX's smallest scale


def plain_fit(x: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Per group (rows of x, fp32): (scale, bias) [n, 1] fp32 as mlx.core.quantize computes them."""
    n_bins = np.float32((1 << bits) - 1)
    top, bottom = x.max(-1, keepdims=True), x.min(-1, keepdims=True)
    below = np.abs(bottom) > np.abs(top)
    scale = np.maximum((top - bottom) / n_bins, EPS).astype(np.float32)
    scale = np.where(below, scale, -scale)
    edge = np.where(below, bottom, top)
    q0 = np.rint(edge / scale)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(q0 != 0, edge / q0, scale).astype(np.float32)
    return scale, np.where(q0 == 0, 0, edge).astype(np.float32)


def levels_of(x: np.ndarray, scale: np.ndarray, bias: np.ndarray, bits: int) -> np.ndarray:
    return np.clip(np.rint((x - bias) / scale), 0, (1 << bits) - 1)


def pack(levels: np.ndarray, bits: int) -> np.ndarray:
    """Levels [n, k] (k a multiple of 32) -> uint32 [n, k * bits / 32]: every 32 levels fill `bits` words."""
    n, k = levels.shape
    q = levels.astype(np.uint64).reshape(n, k // 32, 32)
    words = np.zeros((n, k // 32, bits), np.uint64)
    for j in range(32):
        word, offset = divmod(j * bits, 32)
        words[:, :, word] |= (q[:, :, j] << np.uint64(offset)) & np.uint64(0xFFFFFFFF)
        if offset + bits > 32:  # the level runs on into the next word
            words[:, :, word + 1] |= q[:, :, j] >> np.uint64(32 - offset)
    return words.astype(np.uint32).reshape(n, k * bits // 32)


def unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    """uint32 [n, k * bits / 32] -> levels [n, k] (uint8)."""
    n = packed.shape[0]
    words = packed.astype(np.uint64).reshape(n, -1, bits)
    out = np.empty((n, words.shape[1], 32), np.uint8)
    mask = np.uint64((1 << bits) - 1)
    for j in range(32):
        word, offset = divmod(j * bits, 32)
        value = words[:, :, word] >> np.uint64(offset)
        if offset + bits > 32:
            value |= words[:, :, word + 1] << np.uint64(32 - offset)
        out[:, :, j] = (value & mask).astype(np.uint8)
    return out.reshape(n, -1)


def dequantize(packed: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor, bits: int) -> torch.Tensor:
    """The [out, in] fp32 values an MLX quantized layer holds."""
    levels = torch.from_numpy(unpack(packed.numpy().view(np.uint32), bits)).float()
    n, groups = scales.shape
    levels = levels.reshape(n, groups, -1)
    return (levels * scales.float()[..., None] + biases.float()[..., None]).reshape(n, -1)


def quantize_plain(weight: torch.Tensor, bits: int, group_size: int, dtype: torch.dtype):
    """mlx.core.quantize of an [out, in] matrix: (packed uint32, scales, biases in dtype, the values held fp32).
    As MLX does, the levels are found with the fp32 scales and the scales are then stored in dtype."""
    w = weight.to(dtype).float().numpy()
    n, k = w.shape
    groups = w.reshape(n, k // group_size, group_size)
    scale, bias = plain_fit(groups, bits)
    levels = levels_of(groups, scale, bias, bits).reshape(n, k)
    return _stored(levels, scale[..., 0], bias[..., 0], bits, dtype)


def quantize_weighted(weight: torch.Tensor, importance: torch.Tensor, bits: int, group_size: int,
                      dtype: torch.dtype):
    """Each group's scale and bias the importance-weighted least-squares fit (the calibration's per-column mean
    square input), the values rounded to the nearest level: (packed, scales, biases, values held)."""
    w = weight.float().numpy()
    n, k = w.shape
    fitting = codec(bits, group_size, dtype)
    groups = w.reshape(n * k // group_size, group_size)
    weights = np.broadcast_to(column_importance(importance.float().numpy(), k).reshape(k // group_size, group_size),
                              (n, k // group_size, group_size)).reshape(groups.shape)
    scale, bias = fitting.fit(groups, weights)
    levels = levels_of(groups, scale, bias, bits).reshape(n, k)
    return _stored(levels, scale.reshape(n, -1), bias.reshape(n, -1), bits, dtype)


def _stored(levels: np.ndarray, scale: np.ndarray, bias: np.ndarray, bits: int, dtype: torch.dtype):
    scales, biases = torch.from_numpy(scale).to(dtype), torch.from_numpy(bias).to(dtype)
    packed = torch.from_numpy(pack(levels, bits).view(np.int32)).view(torch.uint32)
    held = dequantize(packed, scales, biases, bits)
    return packed, scales, biases, held


def codec(bits: int, group_size: int, dtype: torch.dtype) -> Codec:
    """Groups for GPTQ: each group's scale and bias the importance-weighted least-squares fit, rounded to dtype
    as stored (so GPTQ rounds on the grid the file holds); a record is the scale, the bias (fp32) and the levels."""
    nmax = (1 << bits) - 1

    def fit(x: np.ndarray, importance: np.ndarray):
        scale, bias = affine_search(x, importance, nmax)
        constant = scale <= 0  # one value in the group (or none that matter): MLX's own rule holds it exactly
        plain_scale, plain_bias = plain_fit(x, bits)
        scale, bias = np.where(constant, plain_scale, scale), np.where(constant, plain_bias, bias)
        as_stored = lambda a: torch.from_numpy(a.astype(np.float32)).to(dtype).float().numpy()  # noqa: E731
        return as_stored(scale), as_stored(bias)

    def grid(params) -> Grid:
        scale, bias = params
        return Grid(np.repeat(scale, group_size, -1), np.repeat(bias, group_size, -1), 0, nmax)

    def record(params, levels: np.ndarray) -> np.ndarray:
        scale, bias = params
        return np.concatenate([scale, bias, levels.astype(np.float32)], axis=-1)

    return Codec(group_size, fit, grid, record)


def from_records(records: np.ndarray, n: int, k: int, bits: int, group_size: int, dtype: torch.dtype):
    """The GPTQ codec's records [n, groups * (2 + group_size)] -> (packed, scales, biases, values held)."""
    r = records.reshape(n, k // group_size, 2 + group_size)
    return _stored(r[:, :, 2:].reshape(n, k), np.ascontiguousarray(r[:, :, 0]), np.ascontiguousarray(r[:, :, 1]),
                   bits, dtype)
