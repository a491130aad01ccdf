"""The torch maths behind the fused layers (the CPU path, and the reference the GPU tests check the
FlashInfer kernels against): RMSNorm with a residual, silu_and_mul's [gate | up] layout."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from workers.layers.mlp import GatedMLP, silu_and_mul
from workers.layers.norm import RMSNorm


def norms(dim: int, eps: float, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    weight = (1 + 0.1 * torch.randn(dim, generator=g)).to(dtype)
    ours, theirs = RMSNorm(dim, eps).to(dtype), LlamaRMSNorm(dim, eps).to(dtype)
    ours.weight.data.copy_(weight)
    theirs.weight.data.copy_(weight)
    return ours, theirs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(7, 64), (5, 4, 32)])  # hidden states; per-head q/k
def test_rmsnorm_equals_transformers(dtype, shape):
    ours, theirs = norms(shape[-1], 1e-6, dtype)
    x = (3 * torch.randn(shape, generator=torch.Generator().manual_seed(1))).to(dtype)
    assert torch.equal(ours(x), theirs(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_with_residual_equals_the_add_then_the_norm(dtype):
    ours, theirs = norms(64, 1e-5, dtype)
    g = torch.Generator().manual_seed(2)
    x, residual = torch.randn(9, 64, generator=g).to(dtype), torch.randn(9, 64, generator=g).to(dtype)
    out, new_residual = ours(x, residual)
    assert torch.equal(new_residual, residual + x)  # the sum transformers' decoder layer forms
    assert torch.equal(out, theirs(residual + x))


def test_silu_and_mul_reads_gate_then_up():
    g = torch.Generator().manual_seed(3)
    gate, up = torch.randn(6, 16, generator=g), torch.randn(6, 16, generator=g)
    torch.testing.assert_close(silu_and_mul(torch.cat([gate, up], dim=-1)), F.silu(gate) * up)


def test_gated_mlp_applies_silu_to_the_gate_projection():
    """The checkpoint's gate_proj and up_proj loaded into the fused gate_up_proj: silu goes to gate's rows."""
    g = torch.Generator().manual_seed(4)
    hidden, inter = 32, 48
    gate_w, up_w, down_w = (torch.randn(inter, hidden, generator=g), torch.randn(inter, hidden, generator=g),
                            torch.randn(hidden, inter, generator=g))
    mlp = GatedMLP(hidden, inter)
    mlp.gate_up_proj.load(gate_w, "gate", False)
    mlp.gate_up_proj.load(up_w, "up", False)
    mlp.down_proj.load(down_w, "", False)
    x = torch.randn(5, hidden, generator=g)
    expected = F.linear(F.silu(F.linear(x, gate_w)) * F.linear(x, up_w), down_w)
    torch.testing.assert_close(mlp(x), expected, rtol=1e-5, atol=1e-5)
