"""Plain float matrices (fp32 / fp16 / bf16).

On the CPU, a matrix whose values are all bf16 numbers (a bf16 scheme, or fp32 weights read from a bf16
file) is held as bf16 rows (Bf16RowsWeight): widening bf16 to fp32 is exact, so an fp32 strategy gives the
same numbers from half the memory and half the bytes read per token, which is what bounds decoding."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .kernels import bf16_matmul, rows_library

KERNEL_TOKENS = 4  # up to here the C kernel beats torch (it reads the weights once per 4 tokens)
_WIDEN_BLOCK = 1 << 22  # fp32 elements widened at once for longer inputs: 16 MB, one block in cache


def gemv_friendly(weight: torch.Tensor) -> torch.Tensor:
    """Same [out, in] matrix, stored column-major when out >= in and fp32. CPU BLAS streams a one-token
    x @ W.T much faster from that layout (measured: the 65536x768 head 9 ms vs 34 ms, 3072x768 0.44 vs 0.75
    ms), and no slower for sequences; for in > out the row-major layout is the faster one. Not for bf16: its
    GEMV is slower column-major (the head 8.4 ms vs 4.7 ms)."""
    if weight.dim() == 2 and weight.dtype == torch.float32 and weight.shape[0] >= weight.shape[1]:
        return weight.t().contiguous().t()
    return weight


def _bf16_values(weight: torch.Tensor) -> bool:
    if weight.dtype == torch.bfloat16:
        return True
    if weight.dtype != torch.float32:
        return False
    rows = max(1, _WIDEN_BLOCK // max(1, weight.shape[-1]))  # in blocks: no full-size temporaries
    return all(torch.equal(block.bfloat16().float(), block) for block in weight.split(rows))


def held_float_for_cpu(value):
    """How the runner holds a matrix it computes with on the CPU: Bf16RowsWeight (or Bf16RowsProjections)
    where that loses nothing, else the value itself. Writers of files never see these forms."""
    if isinstance(value, FloatWeight):
        return cpu_bf16_rows(value.weight, value.weight.dtype) or value
    if isinstance(value, StackedFloatWeight):
        rows = [cpu_bf16_rows(m.t(), value.stacked.dtype) for m in value.stacked]
        if all(rows):  # the C kernel beats the batched matmul: one call per projection
            return Bf16RowsProjections(value.names, rows)
    return value


def cpu_bf16_rows(weight: torch.Tensor, dtype: torch.dtype) -> Bf16RowsWeight | None:
    """The matrix as bf16 rows for the CPU's C kernel when that loses nothing (and the kernel builds),
    else None. dtype: the scheme's (what the matrix is on other devices)."""
    if weight.device.type != "cpu" or weight.dim() != 2 or rows_library() is None or not _bf16_values(weight):
        return None
    return Bf16RowsWeight(weight.to(torch.bfloat16).contiguous(), dtype)


def held_lora_for_cpu(factor: torch.Tensor, atype: torch.dtype):
    """How the runner holds a LoRA factor [in, out] of a CPU layer computing in atype: as bf16 rows for the
    C kernel where its values are bf16 numbers (half the bytes of fp32; torch's one-row products with
    these small matrices are slow), else in fp32 for a bf16/fp16 layer (small bf16 matmuls cost ~3x fp32's
    there), else as it is."""
    if (factor.device.type == "cpu" and factor.dim() == 2 and rows_library() is not None
            and atype in (torch.float32, torch.bfloat16) and _bf16_values(factor)):
        return Bf16LoraFactor(factor.t().to(torch.bfloat16).contiguous())
    return factor if atype == torch.float32 else factor.float()


@dataclass
class Bf16LoraFactor:
    """A LoRA factor [in, out] held as bf16 rows [out, in]. left_multiply(x) is x @ factor with fp32 products
    and sums, in x's dtype (arch.common.lora_product calls it): the C kernel for a few tokens, torch for
    longer inputs."""

    rows: torch.Tensor  # bf16 [out, in], contiguous

    def left_multiply(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and x.shape[0] <= KERNEL_TOKENS:
            return bf16_matmul(x, self.rows).to(x.dtype)
        factor = self.rows.t()
        return torch.matmul(x, factor if x.dtype == torch.bfloat16 else factor.to(x.dtype))

    @property
    def nbytes(self) -> int:
        return self.rows.numel() * self.rows.element_size()


@dataclass
class Bf16RowsWeight:
    """A CPU matrix stored as bf16 [out, in] rows and multiplied with fp32 products and sums: by the C
    kernel for a few tokens, else (longer inputs) by torch, in bf16 for bf16 activations and block by block
    widened to fp32 for fp32 ones."""

    weight: torch.Tensor  # bf16 [out, in], contiguous
    dtype: torch.dtype  # the scheme's: fp32 weights from a bf16 file, or bf16

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and x.shape[0] <= KERNEL_TOKENS:
            return bf16_matmul(x, self.weight).to(x.dtype)
        if x.dtype == torch.bfloat16:
            return F.linear(x, self.weight)
        rows = max(1, _WIDEN_BLOCK // self.weight.shape[1])
        blocks = [F.linear(x, self.weight[i:i + rows].to(x.dtype)) for i in range(0, self.weight.shape[0], rows)]
        return blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=-1)

    def dequantize(self) -> torch.Tensor:
        return self.weight.float()

    def to(self, device):
        if torch.device(device).type == "cpu":
            return self
        return FloatWeight(self.weight.to(device=device, dtype=self.dtype))

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()


@dataclass
class FloatWeight:
    weight: torch.Tensor  # [out, in]

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def dequantize(self) -> torch.Tensor:
        return self.weight.float()

    def to(self, device) -> FloatWeight:
        return FloatWeight(gemv_friendly(self.weight.to(device)))

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()


@dataclass(frozen=True)
class FloatScheme:
    dtype: torch.dtype

    @property
    def name(self) -> str:
        return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[self.dtype]

    def quantize(self, weight: torch.Tensor, atype: torch.dtype) -> FloatWeight:
        return FloatWeight(gemv_friendly(weight.to(self.dtype)))


@dataclass
class StackedFloatWeight:
    """Several same-shaped projections of one layer in one [n, in, out] tensor. One token: one batched
    matmul (measured 0.32 ms vs 0.51 ms for three 768x768 fp32 matmuls); sequences: one matmul each
    (faster there than the batched form)."""

    names: tuple[str, ...]
    stacked: torch.Tensor  # [n, in, out]

    def matmul_many(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        xs = [inputs[name] for name in self.names]
        if xs[0].shape[0] == 1:
            out = torch.bmm(torch.stack(xs), self.stacked)
            return dict(zip(self.names, out.unbind(0), strict=True))
        return {name: F.linear(x, self.stacked[j].t()) for j, (name, x) in enumerate(zip(self.names, xs, strict=True))}

    def to(self, device) -> StackedFloatWeight:
        return StackedFloatWeight(self.names, self.stacked.to(device))

    @property
    def nbytes(self) -> int:
        return self.stacked.numel() * self.stacked.element_size()


@dataclass
class Bf16RowsProjections:
    """A layer's stacked projections held as Bf16RowsWeight each, on the CPU."""

    names: tuple[str, ...]
    weights: list[Bf16RowsWeight]

    def matmul_many(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: w.matmul(inputs[name]) for name, w in zip(self.names, self.weights, strict=True)}

    def to(self, device):
        if torch.device(device).type == "cpu":
            return self
        dtype = self.weights[0].dtype
        return StackedFloatWeight(self.names, torch.stack([w.weight.t() for w in self.weights]).to(device, dtype))

    @property
    def nbytes(self) -> int:
        return sum(w.nbytes for w in self.weights)
