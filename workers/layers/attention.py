"""Self-attention wiring shared by every architecture: fused qkv projection, optional per-head q/k
RMSNorm (Qwen3), rotary embedding, the attention backend over the paged cache, output projection."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from workers.attention import AttentionBackend
from workers.layers.linear import ColumnParallelLinear, RowParallelLinear
from workers.layers.norm import RMSNorm
from workers.layers.parallel import TPGroup
from workers.layers.rotary import RotaryEmbedding


@dataclass
class ForwardContext:
    """What one step's forward needs besides token ids; built by the runner, never global.
    positions, seq_lens: [tokens] on the model's device (seq_lens: the token's row's kv length)."""

    attn: AttentionBackend
    positions: torch.Tensor
    seq_lens: torch.Tensor
    # [tokens, q + k + v widths]: where the qkv projection writes while pieces are captured, so the
    # graphs leave q, k and v where the attention between them reads (graphs.Pieces); else None
    qkv: torch.Tensor | None = None


class SelfAttention(nn.Module):
    def __init__(self, layer_id: int, hidden: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 rope: RotaryEmbedding, tp: TPGroup, qkv_bias: bool = False, qk_norm_eps: float | None = None):
        super().__init__()
        self.layer_id = layer_id
        self.head_dim = head_dim
        self.num_heads = tp.shard(num_heads, "attention heads")
        # KV heads are split over ranks, or replicated when there are fewer than ranks
        copies = max(1, tp.size // num_kv_heads)
        if (num_kv_heads * copies) % tp.size:
            raise ValueError(f"{num_kv_heads} KV heads cannot be split over tp={tp.size}")
        self.num_kv_heads = num_kv_heads * copies // tp.size
        self.qkv_proj = ColumnParallelLinear(
            hidden,
            {"q": num_heads * head_dim, "k": num_kv_heads * head_dim, "v": num_kv_heads * head_dim},
            bias=qkv_bias, tp=tp, replicate={"k": copies, "v": copies},
        )
        self.o_proj = RowParallelLinear(num_heads * head_dim, hidden, tp=tp)
        self.q_norm = RMSNorm(head_dim, qk_norm_eps) if qk_norm_eps is not None else None
        self.k_norm = RMSNorm(head_dim, qk_norm_eps) if qk_norm_eps is not None else None
        self.rope = rope
        # an FP8 KV cache stores K / k_scale and V / v_scale: the checkpoint's scalars where it has them
        self.k_scale = 1.0
        self.v_scale = 1.0

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        out = None if ctx.qkv is None else ctx.qkv[: x.shape[0]]
        q, k, v = self.qkv_proj(x, out=out).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rope(ctx.positions, q, k, ctx.seq_lens)
        out = ctx.attn.forward(self.layer_id, q, k, v)
        return self.o_proj(out.flatten(1))
