"""Vocab-parallel embedding and LM head: each rank holds a contiguous slice of the vocabulary."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from toka.arith import cdiv
from workers.layers.parallel import SINGLE, TPGroup


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden: int, tp: TPGroup = SINGLE):
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        self.local_vocab = cdiv(vocab_size, tp.size)  # the last shard may be padded
        self.start = tp.rank * self.local_vocab
        self.weight = nn.Parameter(torch.empty(self.local_vocab, hidden), requires_grad=False)

    def load(self, tensor: torch.Tensor, shard: str, is_bias: bool) -> None:
        part = tensor[self.start : self.start + self.local_vocab]
        self.weight.data[: part.shape[0]].copy_(part)
        self.weight.data[part.shape[0] :].zero_()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.local_vocab)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside.unsqueeze(-1), 0)
        return self.tp.all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """Logits for the full vocabulary, in the weights' dtype (sampling reads them once, in float32
    arithmetic): each rank computes its slice, then they gather.

    With tied embeddings the model passes the embedding so both share one weight.
    """

    def __init__(self, vocab_size: int, hidden: int, tp: TPGroup = SINGLE, tied: VocabParallelEmbedding | None = None):
        super().__init__(vocab_size, hidden, tp)
        if tied is not None:
            self.weight = tied.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden, self.weight)
        return self.tp.all_gather_last(logits)[..., : self.vocab_size]

    def reduce_slices(self, hidden: torch.Tensor, reduce) -> torch.Tensor:
        """`reduce(logits, first_id)` maps this rank's logits [rows, V'] of vocab ids first_id ..
        first_id + V' - 1 to [rows, k]; returns every rank's result, [tp, rows, k] in rank (vocab)
        order. Sampling gathers a few numbers a row this way instead of the logits."""
        logits = F.linear(hidden, self.weight)[:, : max(0, self.vocab_size - self.start)]  # no padding ids
        return self.tp.all_gather_stack(reduce(logits, self.start))
