from __future__ import annotations

import torch
from torch import nn


def _use_flashinfer(x: torch.Tensor, weight: torch.Tensor) -> bool:
    # FlashInfer's norm kernels take half types only, and read the weight as x's dtype unchecked;
    # anything else (CPU, float32 on CUDA) keeps the torch maths
    return x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and weight.dtype == x.dtype


class RMSNorm(nn.Module):
    """RMSNorm, optionally fused with the residual add before it (the `residual` argument).

    On CUDA one FlashInfer kernel does the add and the norm; elsewhere `reference` does them in torch,
    the norm in float32 as transformers does. The weight has the model's dtype.
    """

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)

    def load(self, tensor: torch.Tensor, shard: str, is_bias: bool) -> None:
        self.weight.data.copy_(tensor[:])

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """x: [..., dim]. Without `residual`: norm(x). With it (both [tokens, dim]): (norm(x + residual),
        x + residual), the sum being the next residual. On CUDA the fused kernel overwrites x and
        residual with those two results, so pass tensors nothing else reads afterwards."""
        if not _use_flashinfer(x, self.weight):
            return self.reference(x, residual)
        import flashinfer  # imported on CUDA only: CPU hosts run without it

        if residual is None:
            # one row per token (or per token and head for the q/k norm); reshape copies a strided view
            out = flashinfer.rmsnorm(x.reshape(-1, x.shape[-1]), self.weight, self.eps)
            return out.view(x.shape)
        flashinfer.fused_add_rmsnorm(x, residual, self.weight, self.eps)
        return x, residual

    def reference(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """The torch maths of `forward` (the CPU path; the GPU tests call it to check the kernels)."""
        if residual is not None:
            residual = x + residual
            x = residual
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        out = self.weight * h.to(dtype)
        return out if residual is None else (out, residual)
