"""FP8 linear layers: the weight in e4m3 (float8_e4m3fn) with a float32 scale per output channel, the
activations quantized per token as they arrive, and one `torch._scaled_mm` that applies both scales
(rowwise scaling) and writes the result back in the activations' type.

Every row (a weight's output channel, an activation's token) is scaled so that its largest magnitude
maps to 448, e4m3's largest finite value; rounding to nearest then costs at most 2^-4 of an element's
magnitude (3 mantissa bits), or 2^-10 of the row's scale for elements below 2^-6 / 448 of the row's
largest (e4m3's subnormals).

The FP8 layers are the tensor-parallel linears with another storage: `switch_to_fp8` changes a built
ColumnParallelLinear or RowParallelLinear in place, keeping its name, sharding and collective.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from workers.layers.fp8_kernel import quantize_rows_cuda
from workers.layers.linear import ColumnParallelLinear, RowParallelLinear

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
# an all-zero row's amax is raised to this, so its scale stays positive; a power of two, so torch and the kernel
# read the same float32
MIN_AMAX = 2.0**-40


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (e4m3 [..., K], float32 scales [..., 1]) with x ~ values * scales: a row's scale is
    its amax x (1 / 448), its values x / scale rounded to nearest (ties to even) and saturated at +-448.
    Weights are quantized with this; it is also the reference of the CUDA kernel, which computes the
    same bits (the scale a product with the same float32 reciprocal, the divisions correctly rounded)."""
    xf = x.float()
    # times the float32 reciprocal, as torch's CUDA kernels divide by a scalar and the Triton kernel does
    scale = xf.abs().amax(-1, keepdim=True).clamp(min=MIN_AMAX) * (1.0 / FP8_MAX)
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def quantize_tokens(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_rows of activations [T, K]: one Triton kernel on CUDA, the torch code elsewhere."""
    if x.is_cuda and quantize_rows_cuda is not None:
        return quantize_rows_cuda(x, FP8_MAX, MIN_AMAX)
    return quantize_rows(x)


@dataclass
class Fp8Rows:
    """Activations [T, K] already quantized per token, as the kernel before an FP8 linear writes them
    (silu-and-mul, the RMSNorms use_fp8 marks): e4m3 values, float32 scales [T, 1], and the type the
    linear's output takes."""

    values: torch.Tensor
    scales: torch.Tensor
    dtype: torch.dtype

    @property
    def shape(self) -> torch.Size:
        return self.values.shape

    @classmethod
    def of(cls, x: torch.Tensor) -> Fp8Rows:
        """x [..., K] quantized per token (quantize_tokens) as [T, K]."""
        return cls(*quantize_tokens(x.reshape(-1, x.shape[-1])), x.dtype)


def fp8_linear(x: torch.Tensor | Fp8Rows, weight: torch.Tensor, scale: torch.Tensor,
               bias: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] (or Fp8Rows [T, K]) through weight [N, K] (e4m3, row-major) with scale [N] (float32) ->
    [..., N] in x's type (into `out`, [tokens, N], where given)."""
    if isinstance(x, Fp8Rows):
        return fp8_matmul(x.values, x.scales, weight, scale, x.dtype, bias, out)
    rows = Fp8Rows.of(x)
    return fp8_matmul(rows.values, rows.scales, weight, scale, x.dtype, bias, out).view(*x.shape[:-1], -1)


def fp8_matmul(q: torch.Tensor, q_scale: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype,
               bias: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Quantized activations q [T, K] (e4m3) with q_scale [T, 1] through weight [N, K] with scale [N] ->
    [T, N] in `dtype` (into `out` where given)."""
    # rowwise-scaled FP8 matmuls write bfloat16 only (CUTLASS's kernel on sm89, and sm90 before cuBLAS 12.9),
    # which also fuses a bfloat16 bias; a float16 model's output and bias are converted after
    fused = bias is not None and bias.dtype == torch.bfloat16
    direct = out is not None and out.dtype == torch.bfloat16
    y = torch._scaled_mm(q, weight.t(), scale_a=q_scale, scale_b=scale.view(1, -1), bias=bias if fused else None,
                         out_dtype=torch.bfloat16, **({"out": out} if direct else {})).to(dtype)
    if bias is not None and not fused:
        y = y + bias
    if out is not None and not direct:
        y = out.copy_(y)
    return y


def per_channel(scale: torch.Tensor, rows: int) -> torch.Tensor:
    """A checkpoint's weight scale as float32 [rows]: one per output channel ([rows, 1] or [rows]) as it
    is, one for the whole tensor ([1] or a scalar) repeated."""
    flat = scale.reshape(-1).float()
    if flat.numel() == 1:
        return flat.expand(rows)
    if flat.numel() != rows:
        raise ValueError(f"a weight scale of shape {list(scale.shape)} is neither one per output channel "
                         f"({rows}) nor one per tensor")
    return flat


class _Fp8Weight:
    """The storage both FP8 layers share: `weight` e4m3 [local rows, local in], `weight_scale` float32
    [local rows], both on the layer's device. `scales_in_checkpoint`: the checkpoint's weights are e4m3
    already and each comes with a `weight_scale` tensor; otherwise each weight is quantized as it loads."""

    weight: nn.Parameter
    weight_scale: nn.Parameter
    scales_in_checkpoint: bool

    def _store(self, rows: slice, part: torch.Tensor) -> None:
        """Writes this rank's part of a checkpoint weight into local rows `rows`."""
        part = part.to(self.weight.device)
        if (part.dtype == FP8) != self.scales_in_checkpoint:
            raise ValueError(f"the weight is {str(part.dtype).removeprefix('torch.')}, but the checkpoint's "
                             f"quantization_config {'says' if self.scales_in_checkpoint else 'does not say'} "
                             "its linear layers are float8_e4m3fn")
        if part.dtype == FP8:
            self.weight.data[rows].copy_(part)
            return
        values, scale = quantize_rows(part)
        self.weight.data[rows].copy_(values)
        self.weight_scale.data[rows].copy_(scale.view(-1))


class Fp8ColumnParallelLinear(_Fp8Weight, ColumnParallelLinear):
    """A ColumnParallelLinear in FP8: a rank keeps the scales of the output rows it keeps."""

    def load(self, tensor: torch.Tensor, shard: str, is_bias: bool) -> None:
        if is_bias:
            return super().load(tensor, shard, is_bias)
        local, source = self.rows(shard)
        self._store(local, tensor[source])

    def load_scale(self, tensor: torch.Tensor, shard: str) -> None:
        local, source = self.rows(shard)
        _, rows, copies = self.layout[shard]
        self.weight_scale.data[local].copy_(per_channel(tensor, rows * self.tp.size // copies)[source])

    def forward(self, x: torch.Tensor | Fp8Rows, out: torch.Tensor | None = None) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.weight_scale, self.bias, out=out)


class Fp8RowParallelLinear(_Fp8Weight, RowParallelLinear):
    """A RowParallelLinear in FP8. An e4m3 checkpoint's scale of an output channel covers all of its inputs,
    so every rank keeps the whole scale vector. A weight quantized here gets scales of the rank's own
    columns instead: they differ between ranks, which is fine because each rank's partial sums leave
    `_scaled_mm` already dequantized, so the all-reduce adds plain values as it does without FP8."""

    def load(self, tensor: torch.Tensor, shard: str, is_bias: bool) -> None:
        self._store(slice(None), tensor[:, self.columns()])

    def load_scale(self, tensor: torch.Tensor, shard: str) -> None:
        self.weight_scale.data.copy_(per_channel(tensor, self.weight.shape[0]))

    def forward(self, x: torch.Tensor | Fp8Rows) -> torch.Tensor:
        return self.tp.all_reduce(fp8_linear(x, self.weight, self.weight_scale))


FP8_FORMS = {ColumnParallelLinear: Fp8ColumnParallelLinear, RowParallelLinear: Fp8RowParallelLinear}


def switch_to_fp8(linear: nn.Module, scales_in_checkpoint: bool = False, quantize_held: bool = False) -> None:
    """Gives a built ColumnParallelLinear or RowParallelLinear FP8 storage, in place, so that it keeps its
    place in the model (the class changes as torch.nn.utils.parametrize changes it). Its bfloat16 weight
    is freed; with `quantize_held` its values (random weights) are quantized first, else the storage
    waits for `load`. Raises ValueError for shapes the FP8 matmul cannot take."""
    rows, cols = linear.weight.shape
    if rows % 16 or cols % 16:  # what torch._scaled_mm asks of both dimensions of the weight on CUDA
        raise ValueError(f"FP8 weights need both dimensions divisible by 16; this rank's part is {rows} x {cols}")
    held = linear.weight.data
    linear.__class__ = FP8_FORMS[type(linear)]
    linear.scales_in_checkpoint = scales_in_checkpoint
    linear.weight = nn.Parameter(torch.empty_like(held, dtype=FP8), requires_grad=False)
    linear.weight_scale = nn.Parameter(torch.ones(rows, dtype=torch.float32, device=held.device),
                                       requires_grad=False)
    if quantize_held:
        linear._store(slice(None), held)
