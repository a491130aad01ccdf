"""The paged KV cache: one tensor per layer, [num_pages, 2 (k, v), page_size, kv_heads, head_dim]
(FlashInfer's NHD layout), on the rank's device. The scheduler's page ids index its first axis."""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_layers: int, num_pages: int, page_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        self.page_size = page_size
        self.num_pages = num_pages
        self.data = torch.zeros(num_layers, num_pages, 2, page_size, kv_heads, head_dim, dtype=dtype, device=device)
        self.layers = list(self.data.unbind(0))

    @staticmethod
    def bytes_per_token(num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return num_layers * 2 * kv_heads * head_dim * dtype.itemsize
