from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from workers.layers.fp8 import FP8_MAX, MIN_AMAX, Fp8RowParallelLinear, Fp8Rows
from workers.layers.fp8_kernel import silu_mul_quantize_cuda
from workers.layers.linear import ColumnParallelLinear, RowParallelLinear
from workers.layers.parallel import SINGLE, TPGroup


def _use_flashinfer(gate_up: torch.Tensor) -> bool:
    # the kernel takes half types in rows of whole 16-byte vectors; anything else keeps the torch maths
    return gate_up.is_cuda and gate_up.dtype in (torch.float16, torch.bfloat16) and gate_up.shape[-1] % 8 == 0


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of gate_up = [..., gate | up] -> [..., width / 2]; one FlashInfer kernel on CUDA."""
    if not _use_flashinfer(gate_up):
        return silu_and_mul_reference(gate_up)
    import flashinfer  # imported on CUDA only: CPU hosts run without it

    return flashinfer.silu_and_mul(gate_up)


def silu_and_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """The torch maths of `silu_and_mul` (the CPU path; the GPU tests call it to check the kernel)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def silu_mul_quantize(gate_up: torch.Tensor) -> Fp8Rows:
    """silu_and_mul(gate_up) ([T, 2W]) quantized per token for an FP8 down projection: on CUDA one
    Triton kernel that never writes the product (rows up to fp8_kernel.WHOLE_ROW wide), elsewhere the
    two steps."""
    if _use_flashinfer(gate_up) and silu_mul_quantize_cuda is not None:
        fused = silu_mul_quantize_cuda(gate_up, FP8_MAX, MIN_AMAX)
        if fused is not None:
            return Fp8Rows(*fused, gate_up.dtype)
    return Fp8Rows.of(silu_and_mul(gate_up))


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)), with gate and up fused into one column-parallel matmul."""

    def __init__(self, hidden: int, intermediate: int, tp: TPGroup = SINGLE):
        super().__init__()
        # each rank's output is [its gate rows | its up rows]: the layout silu_and_mul expects
        self.gate_up_proj = ColumnParallelLinear(hidden, {"gate": intermediate, "up": intermediate}, tp=tp)
        self.down_proj = RowParallelLinear(intermediate, hidden, tp=tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if isinstance(self.down_proj, Fp8RowParallelLinear):
            # FP8 down: silu-and-mul quantizes its own output (one pass over gate_up, no bf16 product)
            return self.down_proj(silu_mul_quantize(gate_up.reshape(-1, gate_up.shape[-1]))).view(
                *gate_up.shape[:-1], -1)
        return self.down_proj(silu_and_mul(gate_up))
