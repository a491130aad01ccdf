"""Rotary position embeddings (the rotate-half layout of Llama/Qwen), with the Hugging Face
`rope_scaling` variants: default, linear, llama3 and dynamic NTK."""

from __future__ import annotations

import math

import torch
from torch import nn


def rope_parameters(hf_config) -> dict:
    """Merges transformers 5's `rope_parameters` and the older `rope_theta` + `rope_scaling`."""
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    if "rope_theta" not in params:
        params["rope_theta"] = getattr(hf_config, "rope_theta", 10000.0)
    params.update(getattr(hf_config, "rope_scaling", None) or {})
    kind = params.get("rope_type") or params.get("type") or "default"
    params["rope_type"] = kind
    if kind not in ("default", "linear", "llama3", "dynamic"):
        raise ValueError(f"rope scaling type {kind!r} is not supported (default, linear, llama3, dynamic)")
    return params


def _use_flashinfer(q: torch.Tensor) -> bool:
    # the kernel takes half types; anything else (CPU, float32 on CUDA) keeps the torch maths
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)


def _inv_freq(dim: int, base: float) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))


def _llama3(inv_freq: torch.Tensor, p: dict) -> torch.Tensor:
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_len = p["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """cos/sin for every position up to max_positions, computed once in float64 at load.

    Dynamic NTK changes the frequencies with the sequence's length: positions past the original
    window use frequencies computed for that row's length (as transformers does while decoding).
    """

    def __init__(self, head_dim: int, max_positions: int, params: dict):
        super().__init__()
        self.head_dim = head_dim
        self.kind = params["rope_type"]
        self.base = params["rope_theta"]
        self.factor = params.get("factor", 1.0)
        self.original_max = params.get("original_max_position_embeddings", max_positions)
        inv_freq = _inv_freq(head_dim, self.base)
        if self.kind == "linear":
            inv_freq = inv_freq / self.factor
        elif self.kind == "llama3":
            inv_freq = _llama3(inv_freq, params)
        limit = self.original_max if self.kind == "dynamic" else max_positions
        self.register_buffer("cos_sin", self._table(inv_freq, torch.arange(limit)), persistent=False)
        # FlashInfer's rope reads this same table (float32 [position, cos | sin], rotate-half layout),
        # so it is the same maths; dynamic NTK has no fixed table, and the kernel has these head sizes
        self.fusable = self.kind != "dynamic" and head_dim in (64, 128, 256, 512)

    @staticmethod
    def _table(inv_freq: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        freqs = positions.to(torch.float64)[:, None] * inv_freq[None, :]
        return torch.cat([freqs.cos(), freqs.sin()], dim=-1).float()  # [positions, head_dim]

    def _dynamic(self, positions: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor:
        """Per-token cos/sin with the NTK base rescaled for the token's sequence length."""
        seq = seq_lens.clamp(min=self.original_max).to(torch.float64)
        base = self.base * ((self.factor * seq / self.original_max) - (self.factor - 1)) ** (
            self.head_dim / (self.head_dim - 2)
        )
        exps = torch.arange(0, self.head_dim, 2, dtype=torch.float64, device=positions.device) / self.head_dim
        inv_freq = 1.0 / base[:, None] ** exps[None, :]
        freqs = positions.to(torch.float64)[:, None] * inv_freq
        return torch.cat([freqs.cos(), freqs.sin()], dim=-1).float()

    def forward(self, positions, q, k, seq_lens=None):
        """q: [T, heads, head_dim], k: [T, kv_heads, head_dim] (views with a unit last stride);
        positions, seq_lens: [T] on q's device, positions below max_positions (the kernel reads the
        table unchecked; the engine caps max_model_len there). Returns the rotated (q, k); on CUDA
        one FlashInfer kernel rotates q and k in place."""
        if not (self.fusable and _use_flashinfer(q)):
            return self.reference(positions, q, k, seq_lens)
        import flashinfer  # imported on CUDA only: CPU hosts run without it

        flashinfer.apply_rope_with_cos_sin_cache_inplace(positions, q, k, self.head_dim, self.cos_sin, is_neox=True)
        return q, k

    def reference(self, positions, q, k, seq_lens=None):
        """The torch maths of `forward` (the CPU path; the GPU tests call it to check the kernel)."""
        if self.kind == "dynamic":
            cos_sin = self._dynamic(positions, seq_lens)
        else:
            cos_sin = self.cos_sin[positions]
        cos, sin = cos_sin.unsqueeze(1).chunk(2, dim=-1)
        return _apply(q, cos, sin), _apply(k, cos, sin)


def _apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return out.to(x.dtype)
