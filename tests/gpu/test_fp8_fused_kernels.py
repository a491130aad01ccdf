"""The kernels that quantize their own outputs per token for the FP8 linear after them: silu-and-mul
(before down) and RMSNorm with its residual add (before qkv and gate/up), each against the unfused
steps (the output rounded to bf16, then fp8.quantize_rows), and a gated MLP with an FP8 down
projection against the unfused composition. CUDA, or with TRITON_INTERPRET=1 the kernels alone on
CPU tensors."""

from __future__ import annotations

import os

import pytest
import torch

from workers.layers.fp8 import FP8_MAX, MIN_AMAX, quantize_rows, switch_to_fp8
from workers.layers.fp8_kernel import WHOLE_ROW, norm_quantize_cuda, silu_mul_quantize_cuda
from workers.layers.mlp import GatedMLP, silu_and_mul
from workers.layers.norm import RMSNorm

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
CUDA = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)
DEVICE = "cuda" if CUDA else "cpu"
pytestmark = pytest.mark.skipif(silu_mul_quantize_cuda is None or not (CUDA or INTERPRET),
                                reason="needs CUDA (sm89 or later) and Triton")


def unfused(gate_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """silu(gate) * up in float32 rounded once to the activations' type (as FlashInfer's kernel
    writes it), then quantized per row."""
    gate, up = gate_up.float().chunk(2, dim=-1)
    return quantize_rows((gate / (1 + torch.exp(-gate)) * up).to(gate_up.dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,cols", [(1, 64), (37, 2048), (5, 8192), (3, 1000)])
def test_the_fused_kernel_quantizes_as_the_unfused_steps(dtype, rows, cols):
    g = torch.Generator().manual_seed(cols)
    gate_up = (3 * torch.randn(rows, 2 * cols, generator=g)).to(dtype)
    gate_up[0, :cols] = 0  # a row whose product is zero keeps the smallest scale, and zeros
    q, scale = silu_mul_quantize_cuda(gate_up.to(DEVICE), FP8_MAX, MIN_AMAX)
    want_q, want_scale = unfused(gate_up)
    assert_quantized_alike(q, scale, want_q, want_scale)
    assert (q.cpu()[0].float() == 0).all() and scale[0].item() == want_scale[0].item()  # MIN_AMAX / 448


def assert_quantized_alike(q, scale, want_q, want_scale):
    rows, cols = want_q.shape
    assert q.shape == (rows, cols) and q.dtype == torch.float8_e4m3fn and scale.shape == (rows, 1)
    # a kernel's exp or rsqrt may differ from torch's by an ulp, which moves a bf16 rounding (and a row's
    # amax) now and then: the scales within bf16's step, the values within one e4m3 step
    torch.testing.assert_close(scale.cpu(), want_scale, rtol=2**-6, atol=0)
    got, want = q.cpu().float() * scale.cpu(), want_q.float() * want_scale
    ok = (got - want).abs() <= want.abs() * 2**-3 + want_scale * 2**-9
    if INTERPRET:
        # the interpreter's casts truncate: to bf16 (a row's scale a bf16 step lower), and to e4m3 a value
        # whose mantissa rounds up into the exponent comes out halved
        assert (ok | ((2 * got - want).abs() <= want.abs() * 2**-3)).all()
    else:
        assert ok.all()
        assert (q.view(torch.uint8).cpu() == want_q.view(torch.uint8)).float().mean() > 0.99


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cols", [64, 2048, 1000])
@pytest.mark.parametrize("with_residual", [False, True], ids=["alone", "after-the-add"])
def test_the_norm_kernel_quantizes_as_the_norm_then_the_quantization(dtype, cols, with_residual):
    g = torch.Generator().manual_seed(cols)
    rows = 9
    norm = RMSNorm(cols, 1e-5).to(dtype)
    norm.weight.data.copy_(1 + 0.2 * torch.randn(cols, generator=g))
    x = (2 * torch.randn(rows, cols, generator=g)).to(dtype)
    residual = (2 * torch.randn(rows, cols, generator=g)).to(dtype) if with_residual else None
    want = norm.reference(x, residual)
    want_q, want_scale = quantize_rows(want[0] if with_residual else want)
    got_residual = None if residual is None else residual.to(DEVICE)
    q, scale = norm_quantize_cuda(x.to(DEVICE), got_residual, norm.weight.to(DEVICE), norm.eps, FP8_MAX, MIN_AMAX)
    if with_residual:  # the residual takes the sum in place, as the unquantized kernel's does (bit for bit;
        # the interpreter's cast to bf16 truncates)
        rtol = 2**-7 if INTERPRET and dtype == torch.bfloat16 else 0
        torch.testing.assert_close(got_residual.cpu(), want[1], rtol=rtol, atol=0)
    assert_quantized_alike(q, scale, want_q, want_scale)


def test_rows_past_the_whole_row_are_left_to_the_unfused_steps():
    assert silu_mul_quantize_cuda(torch.zeros(1, 2 * WHOLE_ROW + 2, device=DEVICE), FP8_MAX, MIN_AMAX) is None
    wide = torch.zeros(1, WHOLE_ROW + 1, device=DEVICE)
    assert norm_quantize_cuda(wide, None, wide[0], 1e-5, FP8_MAX, MIN_AMAX) is None


@pytest.mark.skipif(not CUDA, reason="the whole MLP needs CUDA's FP8 matmul")
def test_a_gated_mlp_with_an_fp8_down_projection_fuses_and_agrees():
    torch.manual_seed(0)
    hidden, inter = 2048, 8192
    mlp = GatedMLP(hidden, inter).to(device="cuda", dtype=torch.bfloat16)
    for p in mlp.parameters():
        p.data.normal_(0, hidden**-0.5)
    switch_to_fp8(mlp.gate_up_proj, quantize_held=True)
    switch_to_fp8(mlp.down_proj, quantize_held=True)
    x = torch.randn(300, hidden, device="cuda", dtype=torch.bfloat16)
    want = mlp.down_proj(silu_and_mul(mlp.gate_up_proj(x)))  # FP8 down's own quantization of the product
    got = mlp(x)
    assert got.shape == want.shape and got.dtype == torch.bfloat16
    assert ((got.float() - want.float()).norm() / want.float().norm()).item() < 2**-7
