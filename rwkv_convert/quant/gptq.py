"""GPTQ (Frantar et al., 2022) for GGUF's block types and onnxruntime's MatMulNBits blocks: the columns of a
matrix are rounded one at a time, and each column's rounding error is pushed onto the columns not yet rounded,
in the proportions that keep the matrix's outputs on the calibration activations closest to the original's (the
inverse of the activations' second-moment matrix H = E[x x^T] says how). The output error sum over
(W - Q) H (W - Q)^T is what it lowers, where importance-weighted rounding alone only sees H's diagonal.

The files stay plain blocks (GGUF's or MatMulNBits'): a block's scales are chosen (by the importance-weighted
search) from the block's values as they stand when GPTQ reaches its first column, and every value of the block
is then rounded on that block's grid; the blocks are packed from exactly those scales and levels."""

from __future__ import annotations

import numpy as np

from . import gguf_blocks, matmul_nbits
from .gguf_blocks import Codec, Grid, column_importance

CODECS = {**gguf_blocks.CODECS, **matmul_nbits.CODECS}  # GGUF's block types and onnxruntime's MatMulNBits

DAMP = 0.01  # of H's mean diagonal, added to its diagonal: keeps the inverse stable (the paper's value)
LAZY = 128  # columns whose updates are batched into one matmul for the columns after them


def _inverse_factor(hessian: np.ndarray) -> np.ndarray:
    """The upper Cholesky factor U of H^-1 (H^-1 = U^T U), H damped; its rows give each column's update."""
    h = np.array(hessian, dtype=np.float64)
    dead = np.diag(h) <= 0  # inputs never active on the calibration text: any rounding of them is as good
    h[dead, dead] = 1.0
    h[np.diag_indices_from(h)] += DAMP * float(np.mean(np.diag(h)))
    for _ in range(4):
        try:
            inverse = np.linalg.inv(np.linalg.cholesky(h))  # L^-1, with H = L L^T, so H^-1 = L^-T L^-1
            break
        except np.linalg.LinAlgError:  # not positive definite in floating point: damp harder
            h[np.diag_indices_from(h)] += DAMP * float(np.mean(np.diag(h))) * 10
    else:
        raise ValueError("the activations' second-moment matrix cannot be inverted, even damped")
    return np.linalg.cholesky(inverse.T @ inverse).T


def _compensated(w: np.ndarray, hessian: np.ndarray, size: int, block_grid) -> tuple[np.ndarray, np.ndarray]:
    """GPTQ's loop over the columns of w [n, k] (modified in place): block_grid(start, the block's values as they
    stand now [n, size]) -> the Grid the block is rounded on. Returns (levels, values), both [n, k] fp32."""
    n, k = w.shape
    u = _inverse_factor(hessian).astype(np.float32)
    lazy = max(LAZY // size, 1) * size  # batches of whole blocks
    levels, values = np.empty_like(w), np.empty_like(w)
    for start in range(0, k, lazy):
        end = min(start + lazy, k)
        errors = np.empty((n, end - start), np.float32)
        for block in range(start, end, size):
            grid = block_grid(block, w[:, block:block + size])
            for j in range(size):
                c = block + j
                levels[:, c] = grid.levels(w[:, c], j)
                values[:, c] = grid.values(levels[:, c], j)
                err = (w[:, c] - values[:, c]) / u[c, c]
                w[:, c + 1:end] -= np.outer(err, u[c, c + 1:end])
                errors[:, c - start] = err
        w[:, end:] -= errors @ u[start:end, end:]
    return levels, values


def quantize_gptq(weight: np.ndarray, hessian: np.ndarray, qtype: str) -> tuple[np.ndarray, np.ndarray]:
    """weight [n, k] (the matrix's rows, k a multiple of the type's block), hessian [k, k] (E[x x^T] of its
    inputs) -> (the blocks of qtype (a key of CODECS) as uint8 [n, k / size * bytes], the values they hold [n, k]
    fp32)."""
    if qtype not in CODECS:
        raise ValueError(f"no GPTQ quantizer for {qtype}; choose from {', '.join(CODECS)}")
    return quantize_with(weight, hessian, CODECS[qtype])


def quantize_with(weight: np.ndarray, hessian: np.ndarray, codec: Codec) -> tuple[np.ndarray, np.ndarray]:
    """quantize_gptq with any codec (quant/mlx_groups.py's too): (its records [n, blocks * record], values)."""
    w = np.array(weight, dtype=np.float32)
    n, k = w.shape
    if k % codec.size or hessian.shape != (k, k):
        raise ValueError(f"GPTQ needs rows of whole {codec.size}-value blocks and a [{k}, {k}] matrix; got rows of"
                         f" {k} and {tuple(hessian.shape)}")
    importance = column_importance(np.diag(hessian).astype(np.float32), k)
    scales = []

    def block_grid(block: int, values: np.ndarray) -> Grid:
        scales.append(codec.fit(values, np.broadcast_to(importance[block:block + codec.size], (n, codec.size))))
        return codec.grid(scales[-1])

    levels, values = _compensated(w, hessian, codec.size, block_grid)
    packed = [codec.pack(p, levels[:, b * codec.size:(b + 1) * codec.size]) for b, p in enumerate(scales)]
    return np.concatenate(packed, axis=-1), values


def gptq_on_grid(weight: np.ndarray, hessian: np.ndarray, grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    """GPTQ where every value's grid is fixed in advance (grid.step and grid.offset [n, k]), as the pip package's
    int8 fixes it from the whole matrix's row and column ranges -> (levels, values), both [n, k] fp32."""
    w = np.array(weight, dtype=np.float32)
    if grid.step.shape != w.shape or hessian.shape != (w.shape[1],) * 2:
        raise ValueError(f"a grid of {grid.step.shape} and a moment matrix of {hessian.shape} for a {w.shape} matrix")

    def column(c: int, _values) -> Grid:
        return Grid(grid.step[:, c:c + 1], grid.offset[:, c:c + 1], grid.lo, grid.hi)

    return _compensated(w, hessian, 1, column)
