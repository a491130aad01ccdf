"""The paged KV cache: one tensor per layer, [num_pages, 2 (k, v), page_size, kv_heads, head_dim]
(FlashInfer's NHD layout), on the rank's device. The scheduler's page ids index its first axis.

An FP8 cache (float8_e4m3fn) holds K / k_scale and V / v_scale, with one scale per layer for K and
one for V (the checkpoint's, else 1.0); the attention kernels multiply them back in (K's into the
softmax scale, V's into the output), so the cache is never copied out in a wider type."""

from __future__ import annotations

import torch

from workers.layers.fp8 import FP8, FP8_MAX  # casts beyond e4m3's largest value give NaN: stores saturate first


class KVCache:
    def __init__(self, num_layers: int, num_pages: int, page_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, scales: list[tuple[float, float]] | None = None):
        self.page_size = page_size
        self.num_pages = num_pages
        self.data = torch.zeros(num_layers, num_pages, 2, page_size, kv_heads, head_dim, dtype=dtype, device=device)
        self.layers = list(self.data.unbind(0))
        # (k_scale, v_scale) per layer; only an FP8 cache uses them
        self.scales = scales or [(1.0, 1.0)] * num_layers
        if len(self.scales) != num_layers:
            raise ValueError(f"{len(self.scales)} KV scales for {num_layers} layers")

    def copy_pages(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Every layer's page dst[i] becomes a copy of page src[i] (device index tensors), as bytes:
        the same for any element type, FP8 included."""
        data = self.data.view(torch.uint8)
        data[:, dst] = data[:, src]

    @property
    def fp8(self) -> bool:
        return self.data.dtype == FP8

    def quantize(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v in the cache's element type, as the append writes them."""
        if not self.fp8:
            return k.to(self.data.dtype), v.to(self.data.dtype)
        k_scale, v_scale = self.scales[layer]
        return _to_fp8(k, k_scale), _to_fp8(v, v_scale)

    @staticmethod
    def bytes_per_token(num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return num_layers * 2 * kv_heads * head_dim * dtype.itemsize


def _to_fp8(x: torch.Tensor, scale: float) -> torch.Tensor:
    if scale != 1.0:
        x = x * (1.0 / scale)
    return x.clamp(-FP8_MAX, FP8_MAX).to(FP8)
