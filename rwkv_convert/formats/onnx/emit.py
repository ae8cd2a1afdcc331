"""What every version's ONNX layers are made of: parameters as initializers, linear layers (float MatMul or
onnxruntime's MatMulNBits), norms and token shift. Activations are [B, T, C]; a one-token graph has T = 1."""

from __future__ import annotations

import numpy as np
import torch

from ...arch.common import GROUP_NORM_EPS, LN_EPS
from ...errors import UnsupportedError
from ...quant.gguf_blocks import symmetric_blocks
from ...quant.matmul_nbits import level_bytes
from .graph import MS_DOMAIN, Graph

QUANT_BITS = {"int8": 8, "int4": 4}
BLOCK_SIZE = 32  # MatMulNBits block along K: 32 keeps int4 usable on small widths and int8 near lossless
# The LoRA factors' bits under --onnx-quant (2-D factors whose inputs are whole blocks; v6's batched token-shift
# factor stays float). Measured on the bundled v7 int4: the file 2.73 MB -> 2.10 MB, KL +0.1% (4 bits: 1.98 MB,
# +2.1%); float factors would be a quarter of an int4 file the size of a Q4_0 GGUF.
LORA_BITS = 8
# MatMulNBits' accuracy_level: the type its products are computed in. 4 (int8): activations are quantized per
# block too, about twice the KL of the rounded weights alone, and onnxruntime's CPU kernel for 8-bit weights
# has no fast path without it (measured 30 ms vs 0.09 ms for a 3072x3072 one-token product, fp32 MatMul
# 0.66 ms). 1 (fp32): the activations as they are.
ACCURACY_LEVELS = {"int8": 4, "fp32": 1}


def _nbits_quantizer(bits: int):
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    return quantize_matmul_8bits if bits == 8 else quantize_matmul_4bits


def as_array(t: torch.Tensor, np_dtype) -> np.ndarray:
    """A C-ordered numpy array of `t` in np_dtype, with at most one copy whatever t's dtype and strides."""
    target = torch.float16 if np_dtype == np.float16 else torch.float32
    t = t.detach()
    if t.dtype == target and t.is_contiguous():
        return t.numpy()
    out = torch.empty(t.shape, dtype=target)
    out.copy_(t)
    return out.numpy()


class Emitter:
    def __init__(self, g: Graph, act: str, quant: str, compute: str = "int8", calibrated=None,
                 table_quant: str = "none"):
        """table_quant: the embedding's and head's quantization ("none": float, like the LoRAs and norms).
        calibrated: None, or an object whose inputs(name, w, bits) gives a matrix's MatMulNBits inputs (data,
        scales, zero points) chosen from a calibration text, or None for one it did not quantize."""
        from onnx import TensorProto

        self.g = g
        self.fp16 = act == "fp16"
        self.ACT = TensorProto.FLOAT16 if self.fp16 else TensorProto.FLOAT
        self.F32 = TensorProto.FLOAT
        self.np_act = np.float16 if self.fp16 else np.float32
        self.bits = QUANT_BITS.get(quant)
        self.table_bits = QUANT_BITS.get(table_quant)
        self.accuracy_level = ACCURACY_LEVELS[compute]
        self.calibrated = calibrated

    # ---- parameters ------------------------------------------------------------------------------
    def param(self, name: str, t, fp32: bool = False) -> str:
        """t: a tensor, or an object with make() -> tensor (made only if this export lacks `name`)."""
        if self.g.has_weight(name):  # the other graph of the export already made it
            return self.g.weight(name, None)
        if hasattr(t, "make"):
            t = t.make()
        return self.g.weight(name, as_array(t, np.float32 if fp32 else self.np_act))

    def to_f32(self, x: str) -> str:
        return self.g.cast(x, self.F32) if self.fp16 else x

    def to_act(self, x: str) -> str:
        return self.g.cast(x, self.ACT) if self.fp16 else x

    def scalar(self, value: float, fp32: bool = False) -> str:
        return self.g.const(value, np.float32 if fp32 else self.np_act)

    # ---- layers ----------------------------------------------------------------------------------
    def matmul(self, x: str, name: str, w) -> str:
        """x @ w for a small matrix (a LoRA factor) stored [in, out]: float, or when the layers are quantized,
        MatMulNBits of LORA_BITS where its inputs are whole blocks (a 2-D factor)."""
        w = w.make() if hasattr(w, "make") else w  # small: made again for the second graph
        if self.bits is None or w.dim() != 2 or w.shape[0] % BLOCK_SIZE:
            return self.g.op("MatMul", x, self.param(name, w))
        return self.linear(x, name, w.t(), bits=LORA_BITS)

    def linear(self, x: str, name: str, w: torch.Tensor, table: bool = False, bits: int | None = None) -> str:
        """x @ W.T for a large [out, in] matrix: a float MatMul, or MatMulNBits when quantizing (the layers'
        bits, or the tables' for the head, or `bits`)."""
        bits = bits or (self.table_bits if table else self.bits)
        if bits is None:
            return self.g.op("MatMul", x, self.param(name, w.t()))
        n_out, k = w.shape
        g = self.g
        names = [f"{name}.q{bits}", f"{name}.scales", f"{name}.zero_points"]
        if k % BLOCK_SIZE:
            raise UnsupportedError(f"{name} has {k} input columns, not a multiple of {BLOCK_SIZE}:"
                                   " export it with --quant none")
        if g.has_weight(names[0]):
            inputs = [g.weight(n, None) for n in names]
        else:
            chosen = self.calibrated.inputs(name, w, bits) if self.calibrated is not None else None
            if chosen is None:  # onnxruntime's own packer: each block's range from its minimum and maximum
                wt = as_array(w.t(), np.float32)  # [K, N]
                k_blocks = k // BLOCK_SIZE
                packed = np.zeros((n_out, k_blocks, BLOCK_SIZE * bits // 8), dtype=np.uint8)
                scales = np.zeros((n_out, k_blocks), dtype=np.float32)
                zero_points = np.zeros((n_out, (k_blocks * bits + 7) // 8), dtype=np.uint8)
                _nbits_quantizer(bits)(packed, wt, scales, zero_points, BLOCK_SIZE, n_out, k, False)
                chosen = packed, scales, zero_points
            packed, scales, zero_points = chosen
            inputs = [g.weight(n, a) for n, a in zip(names, (packed, scales.astype(self.np_act), zero_points),
                                                      strict=True)]
        return g.op("MatMulNBits", x, *inputs, domain=MS_DOMAIN, K=k, N=n_out, bits=bits,
                    block_size=BLOCK_SIZE, accuracy_level=self.accuracy_level)

    def gather_rows(self, table, tokens: str) -> str:
        """emb[tokens] for the [V, C] table (a tensor or a _Lazy): a float Gather, or onnxruntime's
        GatherBlockQuantized over symmetric blocks of BLOCK_SIZE along C (scales by the least-squares search
        of quant.gguf_blocks, no zero points: the op's defaults 8 / 128 centre the levels)."""
        g, name, bits = self.g, "emb.weight", self.table_bits
        if bits is None:
            return g.op("Gather", self.param(name, table), tokens)
        names = [f"{name}.q{bits}", f"{name}.scales"]
        if g.has_weight(names[0]):
            inputs = [g.weight(n, None) for n in names]
        else:
            t = table.make() if hasattr(table, "make") else table
            rows = as_array(t, np.float32)
            if rows.shape[1] % BLOCK_SIZE:
                raise UnsupportedError(f"{name} has rows of {rows.shape[1]} values, not a multiple of {BLOCK_SIZE}:"
                                       " export it without --quant-embedding-head")
            scales, levels = symmetric_blocks(rows, bits)
            offset = 1 << (bits - 1)
            data = level_bytes((levels.astype(np.int16) + offset).reshape(rows.shape), bits)
            inputs = [g.weight(names[0], np.ascontiguousarray(data)), g.weight(names[1], scales.astype(self.np_act))]
        return g.op("GatherBlockQuantized", inputs[0], tokens, inputs[1], domain=MS_DOMAIN, gather_axis=0,
                    quantize_axis=1, block_size=BLOCK_SIZE, bits=bits)

    def token_table(self, name: str, rows, ids: str, fp32: bool = False) -> str:
        """table[ids] for a per-token table whose `rows` object yields it in row blocks (shape, blocks(dtype)):
        written to the data file block by block, gathered per token (DeepEmbed, DEA)."""
        dtype = np.float32 if fp32 else self.np_act
        if not self.g.has_weight(name):
            self.g.root.store.add_rows(name, rows.shape, dtype, rows.blocks(dtype))
        return self.g.op("Gather", self.g.weight(name, None), ids)

    def layer_norm(self, x: str, name: str, w: torch.Tensor, b: torch.Tensor, fp32: bool = False) -> str:
        return self.g.op("LayerNormalization", x, self.param(name + ".weight", w, fp32),
                         self.param(name + ".bias", b, fp32), axis=-1, epsilon=LN_EPS)

    def group_norm(self, y: str, n_head: int, name: str, w: torch.Tensor, b: torch.Tensor, fp32: bool) -> str:
        """Per-head normalisation of [B, T, H*N] (ln_x), then the per-channel affine."""
        g = self.g
        dtype = np.float32 if fp32 or not self.fp16 else self.np_act
        head_size = w.numel() // n_head
        heads = g.reshape(y, [0, 0, n_head, head_size])
        normed = g.op("LayerNormalization", heads, g.const(np.ones(head_size), dtype), axis=-1,
                      epsilon=GROUP_NORM_EPS)
        flat = g.reshape(normed, [0, 0, n_head * head_size])
        scaled = g.op("Mul", flat, self.param(name + ".weight", w, fp32))
        return g.op("Add", scaled, self.param(name + ".bias", b, fp32))

    def shifted(self, x: str, last: str) -> str:
        """The previous token's vector at every position of [B, T, C]; `last` [B, C] ends the prior call."""
        g = self.g
        if g.single_step:
            return g.unsqueeze(last, 1)
        head = g.op("Slice", x, g.const([0], np.int64), g.const([-1], np.int64), g.const([1], np.int64))
        return g.op("Concat", g.unsqueeze(last, 1), head, axis=1)

    def lerp(self, x: str, sx: str, name: str, mix: torch.Tensor) -> str:
        """x*mix + sx*(1-mix), the v4/v5 token-shift mix (1-mix precomputed, as the runner does)."""
        g = self.g
        return g.op("Add", g.op("Mul", x, self.param(name, mix)), g.op("Mul", sx, self.param(name + ".rest", 1 - mix)))

    def offset_mix(self, x: str, delta: str, name: str, mix: torch.Tensor) -> str:
        """x + (sx-x)*mix, the v6/v7 form."""
        return self.g.op("Add", x, self.g.op("Mul", delta, self.param(name, mix)))

    def squared_relu_ffn(self, k_in: str, prefix: str, lw: dict) -> str:
        g = self.g
        k = g.op("Relu", self.linear(k_in, prefix + "ffn.key.weight", lw["ffn.key.weight"]))
        return self.linear(g.op("Mul", k, k), prefix + "ffn.value.weight", lw["ffn.value.weight"])

    def gated_ffn(self, kx: str, rx: str, prefix: str, lw: dict) -> str:
        """v4-v6 channel mix after the token-shift mixes: sigmoid(R rx) * V relu(K kx)^2."""
        g = self.g
        r = g.op("Sigmoid", self.linear(rx, prefix + "ffn.receptance.weight", lw["ffn.receptance.weight"]))
        return g.op("Mul", r, self.squared_relu_ffn(kx, prefix, lw))

    def silu(self, x: str) -> str:
        return self.g.op("Mul", x, self.g.op("Sigmoid", x))

    def heads(self, x: str, n_head: int, *tail: int) -> str:
        """[B, T, H*N] -> [B, T, H, *tail] (tail defaults to N)."""
        return self.g.reshape(x, [0, 0, n_head, *(tail or (-1,))])
