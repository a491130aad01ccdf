"""Tensor-parallel sharding without processes: what each rank's layers hold of a checkpoint."""

from __future__ import annotations

import torch

from workers.layers.attention import SelfAttention
from workers.layers.embedding import VocabParallelEmbedding
from workers.layers.linear import RowParallelLinear
from workers.layers.parallel import TPGroup
from workers.layers.rotary import RotaryEmbedding


def attention(rank: int, tp: int, heads=4, kv_heads=2, head_dim=8, hidden=32):
    rope = RotaryEmbedding(head_dim, 64, {"rope_type": "default", "rope_theta": 10000.0})
    return SelfAttention(0, hidden, heads, kv_heads, head_dim, rope, TPGroup(rank, tp))


def test_kv_heads_split_when_ranks_divide_them():
    q, k, v = torch.randn(32, 32), torch.randn(16, 32), torch.randn(16, 32)  # 4 q heads, 2 kv heads of 8
    for rank in range(2):
        attn = attention(rank, 2)
        for name, t in zip("qkv", (q, k, v)):
            attn.qkv_proj.load(t, name, False)
        assert (attn.num_heads, attn.num_kv_heads) == (2, 1)
        w = attn.qkv_proj.weight
        assert torch.equal(w[:16], q[16 * rank : 16 * rank + 16])
        assert torch.equal(w[16:24], k[8 * rank : 8 * rank + 8])
        assert torch.equal(w[24:32], v[8 * rank : 8 * rank + 8])


def test_kv_heads_replicated_when_ranks_outnumber_them():
    k = torch.randn(16, 32)  # 2 kv heads: ranks 0, 1 share head 0; ranks 2, 3 share head 1
    for rank in range(4):
        attn = attention(rank, 4)
        attn.qkv_proj.load(k, "k", False)
        assert (attn.num_heads, attn.num_kv_heads) == (1, 1)
        head = rank // 2
        assert torch.equal(attn.qkv_proj.weight[8:16], k[8 * head : 8 * head + 8])


def test_row_parallel_and_vocab_shards_cover_the_whole_tensor():
    w = torch.randn(6, 8)
    parts = []
    for rank in range(2):
        row = RowParallelLinear(8, 6, TPGroup(rank, 2))
        row.load(w, "", False)
        parts.append(row.weight.data)
    assert torch.equal(torch.cat(parts, dim=1), w)
    emb = torch.randn(7, 4)  # 7 rows over 2 ranks: the last shard is padded with zeros
    shards = []
    for rank in range(2):
        e = VocabParallelEmbedding(7, 4, TPGroup(rank, 2))
        e.load(emb, "", False)
        shards.append(e.weight.data)
    assert torch.equal(torch.cat(shards)[:7], emb) and torch.equal(shards[1][3], torch.zeros(4))
