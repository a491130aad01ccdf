"""FP8 arithmetic and layers on the CPU (torch._scaled_mm has a CPU kernel): e4m3 rounding and
saturation against a float64 reference, scales per channel and per token, the round-trip error,
the FP8 linear against a float64 dequantized reference, and tensor-parallel slicing of weights and
scales."""

from __future__ import annotations

import pytest
import torch

from workers.layers.attention import SelfAttention
from workers.layers.fp8 import (
    FP8,
    FP8_MAX,
    Fp8ColumnParallelLinear,
    fp8_linear,
    quantize_rows,
    switch_to_fp8,
)
from workers.layers.linear import RowParallelLinear
from workers.layers.mlp import GatedMLP, silu_and_mul
from workers.layers.parallel import TPGroup
from workers.layers.rotary import RotaryEmbedding

# every finite non-negative e4m3 value, ascending, exactly (decoding is exact in float64)
GRID = torch.arange(0, 127, dtype=torch.uint8).view(FP8).double()


def e4m3_reference(v: torch.Tensor) -> torch.Tensor:
    """v (float64) rounded to the nearest e4m3 value, ties to the even code, saturated at +-448."""
    mag = v.abs().clamp(max=FP8_MAX)
    hi = torch.searchsorted(GRID, mag).clamp(max=len(GRID) - 1)
    lo = (hi - 1).clamp(min=0)
    d_lo, d_hi = mag - GRID[lo], GRID[hi] - mag
    pick = torch.where(d_lo < d_hi, lo, torch.where(d_hi < d_lo, hi, torch.where(lo % 2 == 0, lo, hi)))
    return GRID[pick] * v.sign()


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_e4m3_rounding_matches_a_float64_reference():
    """Rows whose amax is 448 have scale 1, so their values are rounded as they are: every grid point,
    every midpoint between neighbours (the ties), and random values across e4m3's whole range."""
    mids = (GRID[1:] + GRID[:-1]) / 2
    rand = torch.exp(torch.empty(4000, dtype=torch.float64).uniform_(-12, 6.1, generator=gen()))
    values = torch.cat([GRID, mids, rand.clamp(max=FP8_MAX)])
    values = torch.cat([values, -values])
    pad = (-len(values)) % 127
    rows = torch.cat([values, torch.zeros(pad, dtype=torch.float64)]).view(-1, 127)
    rows = torch.cat([rows, torch.full((len(rows), 1), FP8_MAX, dtype=torch.float64)], 1)
    q, scale = quantize_rows(rows.float())
    assert torch.equal(scale, torch.ones_like(scale))
    assert torch.equal(q.double(), e4m3_reference(rows))


def test_saturation_at_448_where_the_division_rounds_past_it():
    """fl(amax / fl(amax / 448)) can come out just above 448; the clamp keeps it finite (e4m3fn's cast
    would give NaN from 464 on) and it rounds to 448."""
    cands = torch.empty(100000).uniform_(1, 2, generator=gen(1))
    over = cands[cands / (cands / FP8_MAX) > FP8_MAX]
    assert len(over)
    rows = torch.stack([over[:64], -over[:64] / 3], 1)
    q, _ = quantize_rows(rows)
    assert torch.equal(q[:, 0].float(), torch.full((len(rows[:64]),), FP8_MAX))
    assert not q.float().isnan().any()


def test_scales_are_amax_over_448_per_row_and_zero_rows_stay_zero():
    x = torch.randn(6, 300, generator=gen()) * torch.tensor([1e-3, 0.1, 1.0, 10.0, 1e3, 0.0])[:, None]
    q, scale = quantize_rows(x)
    want = x.double().abs().amax(1, keepdim=True) / FP8_MAX
    torch.testing.assert_close(scale[:5].double(), want[:5], rtol=2**-23, atol=0)
    assert scale.shape == (6, 1) and scale.dtype == torch.float32
    assert 0 < scale[5].item() < 1e-12 and torch.equal(q[5].float(), torch.zeros(300))  # no NaN from 0 / 0
    # each row's largest magnitude is 448 exactly (amax / scale rounds to it)
    assert torch.equal(q[:5].float().abs().amax(1), torch.full((5,), FP8_MAX))


def test_round_trip_error_is_within_e4m3s_spacing():
    """Per element: at most half a spacing, 2^-4 of the value (3 mantissa bits) in e4m3's normal range
    and 2^-10 of the scale below it (subnormals). Over Gaussian rows the relative RMS error is
    2^-3 / sqrt(12) (a uniform error over one spacing, relative to the binade's start) times
    sqrt(E[1 / m^2]) = sqrt(1/2) for mantissas m uniform on [1, 2): 0.0255; measured 0.0264."""
    x = torch.randn(64, 4096, generator=gen()).double()
    q, scale = quantize_rows(x)
    back = q.double() * scale.double()
    assert ((back - x).abs() <= 2**-4 * x.abs() + 2**-10 * scale.double()).all()
    rel = ((back - x).norm() / x.norm()).item()
    assert 0.024 < rel < 0.029, rel


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp8_linear_matches_the_float64_dequantized_product(dtype):
    """Against the float64 product of the same e4m3 values and scales, only float32 accumulation and
    roundings are left: of the output to bfloat16 (at most 2^-8 relative), with a float16 model also
    of that to float16 and of adding the bias there (a bfloat16 bias is fused, added before rounding)."""
    x = torch.randn(2, 33, 256, generator=gen()).to(dtype)
    w = (torch.randn(96, 256, generator=gen(1)) / 16).to(dtype)
    bias = torch.randn(96, generator=gen(2)).to(dtype)
    wq, ws = quantize_rows(w)
    y = fp8_linear(x, wq, ws.view(-1), bias)
    assert y.shape == (2, 33, 96) and y.dtype == dtype
    xq, xs = quantize_rows(x.reshape(-1, 256))
    product = (xq.double() * xs.double()) @ (wq.double() * ws.double()).t()
    ref = product + bias.double()
    err = (y.reshape(-1, 96).double() - ref).abs()
    assert (err <= 2**-8 * (product.abs() + ref.abs()) + 1e-5).all(), err.max()


def test_fp8_linear_error_against_the_exact_product():
    """Each product x_k w_k carries two independent relative errors of RMS 0.026 (the round trip
    above), so the output's relative RMS error is about sqrt(2) x 0.026 = 0.037 whatever K: errors
    and values both add up as random sums over K. Measured 0.037 for these shapes."""
    for k, n in ((256, 512), (2048, 128)):
        x = torch.randn(64, k, generator=gen()).bfloat16()
        w = (torch.randn(n, k, generator=gen(1)) / k**0.5).bfloat16()
        wq, ws = quantize_rows(w)
        exact = x.double() @ w.double().t()
        rel = ((fp8_linear(x, wq, ws.view(-1)).double() - exact).norm() / exact.norm()).item()
        assert 0.032 < rel < 0.042, (k, n, rel)


def attention(rank: int, tp: int, heads=4, kv_heads=2, head_dim=16, hidden=64) -> SelfAttention:
    rope = RotaryEmbedding(head_dim, 64, {"rope_type": "default", "rope_theta": 10000.0})
    return SelfAttention(0, hidden, heads, kv_heads, head_dim, rope, TPGroup(rank, tp))


def qkv_tensors():
    q, k, v = (torch.randn(n, 64, generator=gen(i)).bfloat16() for i, n in enumerate((64, 32, 32)))
    return {"q": q, "k": k, "v": v}


@pytest.mark.parametrize("from_checkpoint", [False, True])
@pytest.mark.parametrize("tp", [2, 4])  # 4: ranks share a KV head
def test_column_parallel_ranks_keep_the_scales_of_their_rows(from_checkpoint, tp):
    """Quantized at load or taken from an FP8 checkpoint, the ranks' rows and scales of each part are
    tp = 1's rows and scales; ranks sharing a KV head hold the same copy."""
    parts = qkv_tensors()
    stored = {name: quantize_rows(t) for name, t in parts.items()}

    def loaded(rank, size):
        attn = attention(rank, size)
        switch_to_fp8(attn.qkv_proj, scales_in_checkpoint=from_checkpoint)
        for name, t in parts.items():
            if from_checkpoint:
                attn.qkv_proj.load(stored[name][0], name, False)
                attn.qkv_proj.load_scale(stored[name][1], name)
            else:
                attn.qkv_proj.load(t, name, False)
        return attn.qkv_proj

    whole = loaded(0, 1)
    assert isinstance(whole, Fp8ColumnParallelLinear) and whole.weight.dtype == FP8
    assert torch.equal(whole.weight[:64].view(torch.uint8), stored["q"][0].view(torch.uint8))
    for name in parts:
        full, _ = whole.rows(name)
        covered = set()
        for rank in range(tp):
            layer = loaded(rank, tp)
            local, source = layer.rows(name)
            assert torch.equal(layer.weight[local].view(torch.uint8), whole.weight[full][source].view(torch.uint8))
            assert torch.equal(layer.weight_scale[local], whole.weight_scale[full][source])
            covered |= set(range(source.start, source.stop))
        assert covered == set(range(full.stop - full.start))


def test_row_parallel_from_a_checkpoint_shares_the_scales_and_quantized_here_owns_them():
    w = torch.randn(64, 128, generator=gen()).bfloat16()
    wq, ws = quantize_rows(w)
    halves = []
    for rank in range(2):
        row = RowParallelLinear(128, 64, TPGroup(rank, 2))
        switch_to_fp8(row, scales_in_checkpoint=True)
        row.load(wq, "", False)
        row.load_scale(ws, "")
        halves.append(row)
        assert torch.equal(row.weight_scale, ws.view(-1))  # an output channel's scale covers all its inputs
    assert torch.equal(torch.cat([h.weight for h in halves], 1).view(torch.uint8), wq.view(torch.uint8))
    x = torch.randn(5, 128, generator=gen(1)).bfloat16()
    partials = []
    for rank in range(2):
        row = RowParallelLinear(128, 64, TPGroup(rank, 2))
        switch_to_fp8(row)
        row.load(w, "", False)
        own_q, own_s = quantize_rows(w[:, 64 * rank : 64 * rank + 64])
        assert torch.equal(row.weight.view(torch.uint8), own_q.view(torch.uint8))
        assert torch.equal(row.weight_scale, own_s.view(-1))
        partials.append(fp8_linear(x[:, 64 * rank : 64 * rank + 64], row.weight, row.weight_scale))
    # the partial sums are dequantized, so adding them (the all-reduce) gives the whole product
    exact = x.double() @ w.double().t()
    assert ((partials[0].double() + partials[1].double() - exact).norm() / exact.norm()).item() < 0.05


def test_a_gated_mlps_fp8_down_projection_takes_silu_and_mul_quantized():
    """An FP8 down projection reads silu-and-mul's output already quantized (fused on CUDA,
    tests/gpu/test_fp8_fused_kernels.py): on the CPU the same bits as the FP8 linear of the product."""
    mlp = GatedMLP(64, 96).bfloat16()
    for p in mlp.parameters():
        p.data.copy_(torch.randn(p.shape, generator=gen(2)) * 0.125)
    switch_to_fp8(mlp.gate_up_proj, quantize_held=True)
    switch_to_fp8(mlp.down_proj, quantize_held=True)
    x = torch.randn(2, 7, 64, generator=gen(3)).bfloat16()
    y = mlp(x)
    assert y.shape == (2, 7, 64) and y.dtype == torch.bfloat16
    assert torch.equal(y, mlp.down_proj(silu_and_mul(mlp.gate_up_proj(x))))


def test_shapes_the_fp8_matmul_cannot_take_are_refused():
    row = RowParallelLinear(40, 64)
    with pytest.raises(ValueError, match="divisible by 16; this rank's part is 64 x 40"):
        switch_to_fp8(row)
