"""Parallel contexts: which tensor-parallel shard this process holds and how shards talk
(`TPGroup`), and which layers of the model its pipeline stage holds (`PipelineStage`).

Layers receive a `TPGroup` at construction and own every collective; model files never touch
torch.distributed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TPGroup:
    rank: int = 0
    size: int = 1
    group: object = None  # the stage's process group under pipeline parallelism; None: the default group

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenates every rank's `x` along the last dimension, in rank order."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)

    def all_gather_stack(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's `x`, stacked in rank order: [size, *x.shape]."""
        if self.size == 1:
            return x[None]
        out = torch.empty((self.size, *x.shape), dtype=x.dtype, device=x.device)
        dist.all_gather(list(out.unbind(0)), x.contiguous(), group=self.group)
        return out

    def shard(self, n: int, what: str) -> int:
        if n % self.size:
            raise ValueError(f"{what} ({n}) is not divisible by tp={self.size}")
        return n // self.size


SINGLE = TPGroup()


@dataclass(frozen=True)
class PipelineStage:
    """Stage `index` of `count` holds decoder layers `layers` (contiguous, global indices); the first
    stage also the embedding, the last the final norm and the LM head."""

    index: int
    count: int
    layers: range

    @classmethod
    def of(cls, num_layers: int, index: int = 0, count: int = 1) -> "PipelineStage":
        """An even split, the earlier stages taking one layer more where it does not divide: the last
        stage also runs the LM head and sampling."""
        if not 1 <= count <= num_layers:
            raise ValueError(f"--pp {count} needs at least as many layers, but the model has {num_layers}")
        size, extra = divmod(num_layers, count)
        start = index * size + min(index, extra)
        return cls(index, count, range(start, start + size + (index < extra)))

    @property
    def first(self) -> bool:
        return self.index == 0

    @property
    def last(self) -> bool:
        return self.index == self.count - 1

    def elsewhere(self, name: str) -> bool:
        """Whether checkpoint tensor `name` belongs to another stage (Hugging Face's decoder naming,
        which every architecture here shares)."""
        parts = name.split(".")
        if parts[:2] == ["model", "layers"] and parts[2].isdigit():
            return int(parts[2]) not in self.layers
        if parts[:2] == ["model", "embed_tokens"]:
            return not self.first
        if parts[:2] == ["model", "norm"] or parts[0] == "lm_head":
            return not self.last
        return False
