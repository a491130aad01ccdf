from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from workers.layers.linear import ColumnParallelLinear, RowParallelLinear
from workers.layers.parallel import SINGLE, TPGroup


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)), with gate and up fused into one column-parallel matmul."""

    def __init__(self, hidden: int, intermediate: int, tp: TPGroup = SINGLE):
        super().__init__()
        self.gate_up_proj = ColumnParallelLinear(hidden, {"gate": intermediate, "up": intermediate}, tp=tp)
        self.down_proj = RowParallelLinear(intermediate, hidden, tp=tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)
