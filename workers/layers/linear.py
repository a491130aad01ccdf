"""Linear layers that own their tensor-parallel sharding and the collective after them.

Weights load through `load(tensor, shard)`: `shard` names which packed part of the output
(e.g. "q", "k", "v" of a fused qkv projection) the checkpoint tensor fills. Each rank copies only
its own slice, so a checkpoint is never materialized whole on a rank.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from workers.layers.parallel import SINGLE, TPGroup


class ColumnParallelLinear(nn.Module):
    """y = x W^T (+ b), W split by output rows; `parts` are the packed outputs' full sizes, each
    split evenly over ranks (replicated ones, e.g. KV heads when tp > KV heads, give `replicate`)."""

    def __init__(self, in_features: int, parts: dict[str, int], bias: bool = False,
                 tp: TPGroup = SINGLE, replicate: dict[str, int] | None = None):
        super().__init__()
        self.tp = tp
        replicate = replicate or {}
        # part -> (offset in the local weight, local rows, ranks sharing one slice)
        self.layout: dict[str, tuple[int, int, int]] = {}
        offset = 0
        for name, full in parts.items():
            copies = replicate.get(name, 1)  # ranks sharing one slice when the part has too few heads
            local = full * copies // tp.size
            if (full * copies) % tp.size:
                raise ValueError(f"{name} ({full}) cannot be split over tp={tp.size}")
            self.layout[name] = (offset, local, copies)
            offset += local
        self.weight = nn.Parameter(torch.empty(offset, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(offset), requires_grad=False) if bias else None

    def rows(self, shard: str) -> tuple[slice, slice]:
        """(rows of the local weight, rows of the checkpoint's tensor) of part `shard` on this rank."""
        offset, local, copies = self.layout[shard]
        start = (self.tp.rank // copies) * local
        return slice(offset, offset + local), slice(start, start + local)

    def load(self, tensor: torch.Tensor, shard: str, is_bias: bool) -> None:
        local, source = self.rows(shard)
        target = self.bias if is_bias else self.weight
        target.data[local].copy_(tensor[source])

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """x [tokens, in] -> [tokens, local out], into `out` where given."""
        if out is None:
            return F.linear(x, self.weight, self.bias)
        if self.bias is None:
            return torch.mm(x, self.weight.t(), out=out)
        return torch.addmm(self.bias, x, self.weight.t(), out=out)


class RowParallelLinear(nn.Module):
    """y = x W^T, W split by input columns; the partial sums are all-reduced across ranks."""

    def __init__(self, in_features: int, out_features: int, tp: TPGroup = SINGLE):
        super().__init__()
        self.tp = tp
        self.local_in = tp.shard(in_features, "row-parallel input")
        self.weight = nn.Parameter(torch.empty(out_features, self.local_in), requires_grad=False)

    def columns(self) -> slice:
        """The input columns of the checkpoint's weight this rank keeps."""
        start = self.tp.rank * self.local_in
        return slice(start, start + self.local_in)

    def load(self, tensor: torch.Tensor, shard: str, is_bias: bool) -> None:
        self.weight.data.copy_(tensor[:, self.columns()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(F.linear(x, self.weight))
