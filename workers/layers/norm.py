from __future__ import annotations

import torch
from torch import nn

from workers.layers.fp8 import FP8_MAX, MIN_AMAX, Fp8Rows
from workers.layers.fp8_kernel import norm_quantize_cuda


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
        # set by quant.use_fp8 where an FP8 linear alone reads this norm: forward then returns its
        # output quantized per token (fp8.Fp8Rows), on CUDA in the norm's own kernel
        self.quantize = False

    def load(self, tensor: torch.Tensor, shard: str, is_bias: bool) -> None:
        self.weight.data.copy_(tensor[:])

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """x: [..., dim]. Without `residual`: norm(x). With it (both [tokens, dim]): (norm(x + residual),
        x + residual), the sum being the next residual. On CUDA the fused kernel overwrites x and
        residual with those two results, so pass tensors nothing else reads afterwards. With
        `quantize`, the norm's output comes as fp8.Fp8Rows [tokens, dim]."""
        if self.quantize:
            return self._quantized(x, residual)
        return self._norm(x, residual)

    def _norm(self, x: torch.Tensor, residual: torch.Tensor | None):
        if not _use_flashinfer(x, self.weight):
            return self.reference(x, residual)
        import flashinfer  # imported on CUDA only: CPU hosts run without it

        if residual is None:
            # one row per token (or per token and head for the q/k norm); reshape copies a strided view
            out = flashinfer.rmsnorm(x.reshape(-1, x.shape[-1]), self.weight, self.eps)
            return out.view(x.shape)
        flashinfer.fused_add_rmsnorm(x, residual, self.weight, self.eps)
        return x, residual

    def _quantized(self, x: torch.Tensor, residual: torch.Tensor | None):
        """forward's results with the output as Fp8Rows: one kernel on CUDA (the residual takes the sum
        in place, as FlashInfer's does), else the norm, then the quantization."""
        fused = None
        if _use_flashinfer(x, self.weight) and norm_quantize_cuda is not None and x.dim() == 2:
            fused = norm_quantize_cuda(x, residual, self.weight, self.eps, FP8_MAX, MIN_AMAX)
        if fused is not None:
            rows = Fp8Rows(*fused, x.dtype)
        else:
            result = self._norm(x, residual)
            out = result if residual is None else result[0]
            rows = Fp8Rows.of(out)
            residual = None if residual is None else result[1]
        return rows if residual is None else (rows, residual)

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
