"""The `rwkv` pip package's int8 scheme, reproduced bit for bit (minus its NaN on constant rows/columns).

On W.T = [in, out] = [N, M] in fp32: subtract the row minima `my` and column minima `mx` (rows first when
N > M, columns first otherwise), divide by the column maxima `rx` then the row maxima `ry`, and store
q = clip(floor(256 W), 0, 255) as uint8, with `_rx = rx / 16`, `_ry = ry / 16` so that
W ≈ (q + 0.5) · _ry · _rx + my + mx. Companions are kept in the activation dtype, as the package does."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..cuda import ops as cuda_ops
from .gguf_blocks import Grid
from .gptq import gptq_on_grid
from .kernels import int8_gemv, int8_library, int8_rows, rows_library


def _safe(divisor: torch.Tensor) -> torch.Tensor:
    # A constant row/column has max 0 after the min is subtracted: the package divides 0 by 0 (NaN).
    # Dividing those zeros by 1 keeps them 0, and q = 0 with r = 0 dequantises to exactly min + min.
    return torch.where(divisor == 0, torch.ones_like(divisor), divisor)


def quantize_rwkv_int8(weight_out_in: torch.Tensor, atype: torch.dtype) -> dict[str, torch.Tensor]:
    """{'q', 'mx', 'rx', 'my', 'ry'} for a [out, in] matrix, exactly as the package computes them."""
    # One fp32 working copy, updated in place (same results as the package's out-of-place ops, a quarter
    # of the peak memory); never write into the (mmap'd) source.
    w = weight_out_in.t().to(torch.float32, copy=True)
    if w.shape[0] > w.shape[1]:
        my = torch.amin(w, dim=1).unsqueeze(1)
        w.sub_(my)
        mx = torch.amin(w, dim=0)
        w.sub_(mx)
    else:
        mx = torch.amin(w, dim=0)
        w.sub_(mx)
        my = torch.amin(w, dim=1).unsqueeze(1)
        w.sub_(my)
    rx = torch.amax(w, dim=0)
    w.div_(_safe(rx))
    ry = torch.amax(w, dim=1).unsqueeze(1)
    w.div_(_safe(ry))
    q = w.mul_(256).floor_().clamp_(0, 255).to(dtype=torch.uint8)
    del w
    return {"q": q.contiguous(), "mx": mx.to(atype).contiguous(), "rx": (rx / 16).to(atype).contiguous(),
            "my": my.to(atype).contiguous(), "ry": (ry / 16).to(atype).contiguous()}


def quantize_rwkv_int8_gptq(weight_out_in: torch.Tensor, atype: torch.dtype, hessian) -> tuple[RwkvInt8Weight,
                                                                                              torch.Tensor]:
    """The pip package's int8 with its levels chosen by GPTQ (quant/gptq.py) from E[x x^T] of the matrix's inputs
    (hessian [in, in]): the same companions (row and column minima and ranges, as the package computes them), so
    the same file size and kernel; only each q differs, each column's rounding error compensated in the columns
    after it. Returns the weight and the [out, in] fp32 values it holds."""
    weight = RwkvInt8Weight(**quantize_rwkv_int8(weight_out_in, atype))
    mx, rx, my, ry = weight._f32  # W[n, m] = (q[n, m] + 0.5) * ry[n] * rx[m] + my[n] + mx[m], n = in, m = out
    step = (rx[:, None] * ry[None, :]).numpy()  # [out, in]: GPTQ's rows are the outputs
    offset = 0.5 * step + (mx[:, None] + my[None, :]).numpy()
    levels, values = gptq_on_grid(weight_out_in.float().numpy(), hessian, Grid(step, offset, 0, 255))
    q = torch.from_numpy(levels.T.astype("uint8")).contiguous()
    return RwkvInt8Weight(q, weight.mx, weight.rx, weight.my, weight.ry), torch.from_numpy(values)


@dataclass
class RwkvInt8Weight:
    q: torch.Tensor  # uint8 [in, out]
    mx: torch.Tensor  # [out]
    rx: torch.Tensor  # [out]
    my: torch.Tensor  # [in, 1]
    ry: torch.Tensor  # [in, 1]

    def __post_init__(self):
        # fp32 copies of the (rounded) companions for the kernel and the dequantisation.
        self._f32 = [t.float().reshape(-1).contiguous() for t in (self.mx, self.rx, self.my, self.ry)]

    def dequantize(self) -> torch.Tensor:
        """[out, in] fp32, from the stored (activation-dtype) companions."""
        mx, rx, my, ry = self._f32
        w = (self.q.float() + 0.5) * ry.unsqueeze(1) * rx + my.unsqueeze(1) + mx
        return w.t()

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and x.dim() == 2 and x.shape[0] == 1 and int8_library() is not None:
            return int8_gemv(x[0].float().contiguous(), self.q, *self._f32).to(x.dtype).unsqueeze(0)
        if x.is_cuda and x.dim() == 2:
            fast = cuda_ops.int8_matmul(x, self.q, self._f32)
            if fast is not None:
                return fast
        # Sequences (and other devices): dequantise once per call, in fp32, then one matmul for all tokens.
        return (x.float() @ self.dequantize().t()).to(x.dtype)

    def to(self, device) -> RwkvInt8Weight:
        return RwkvInt8Weight(*(t.to(device) for t in (self.q, self.mx, self.rx, self.my, self.ry)))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.q, self.mx, self.rx, self.my, self.ry))

    def named_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """In the pip package's converted-file naming."""
        return {name: self.q, name + "_mx": self.mx, name + "_rx": self.rx, name + "_my": self.my,
                name + "_ry": self.ry}


@dataclass
class RwkvInt8Rows:
    """The CPU runner's form of an RwkvInt8Weight: q transposed to [out, in], so that a few tokens read each
    output's bytes in one sequential stream (rows_cpu.c; faster than int8_cpu.c's column blocks). Off the
    CPU, or written to a file, it is the package's form again."""

    q_rows: torch.Tensor  # uint8 [out, in], contiguous
    companions: tuple[torch.Tensor, ...]  # mx, rx, my, ry as stored (activation dtype)

    def __post_init__(self):
        self._f32 = [t.float().reshape(-1).contiguous() for t in self.companions]

    @classmethod
    def held(cls, weight: RwkvInt8Weight) -> RwkvInt8Rows | RwkvInt8Weight:
        if weight.q.device.type != "cpu" or rows_library() is None:
            return weight
        return cls(weight.q.t().contiguous(), (weight.mx, weight.rx, weight.my, weight.ry))

    def package_form(self) -> RwkvInt8Weight:
        return RwkvInt8Weight(self.q_rows.t().contiguous(), *self.companions)

    def dequantize(self) -> torch.Tensor:
        mx, rx, my, ry = self._f32
        return (self.q_rows.float() + 0.5) * ry * rx.unsqueeze(1) + my + mx.unsqueeze(1)  # the package's order

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and x.shape[0] <= ROWS_KERNEL_TOKENS:
            return int8_rows(x, self.q_rows, *self._f32).to(x.dtype)
        return (x.float() @ self.dequantize().t()).to(x.dtype)  # sequences: dequantise once per call

    def to(self, device):
        return self if torch.device(device).type == "cpu" else self.package_form().to(device)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.q_rows, *self.companions))


ROWS_KERNEL_TOKENS = 4  # as float_weights.KERNEL_TOKENS: the kernel reads the weights once per 4 tokens


class RwkvInt8Scheme:
    name = "i8"

    def quantize(self, weight: torch.Tensor, atype: torch.dtype) -> RwkvInt8Weight:
        return RwkvInt8Weight(**quantize_rwkv_int8(weight, atype))
