"""Per-token FP8 quantization of activations in one kernel (Triton, CUDA): per row, the amax, the scale
amax x (1 / 448) and the values x / scale saturated to e4m3, where the torch code (fp8.quantize_rows)
takes five passes over the activations. Both compute the same bits: the scale is a product with the
same float32 reciprocal, the divisions are correctly rounded (Triton's `/` is not, hence div_rn), and
both casts round to nearest even after the clamp.

`silu_mul_quantize_cuda` does the same to silu(gate) * up of a gated MLP's [gate | up] in the same
kernel, so the bf16 product the down projection would quantize is never written and read back, and
`norm_quantize_cuda` the RMSNorm (with its residual add) before an FP8 qkv or gate/up projection.

All are None where Triton is missing (CPU builds of torch).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: fp8.py uses the torch code
    triton = None

WHOLE_ROW = 16384  # rows up to this many elements are read once, held in registers; longer ones twice
BLOCK = 4096  # the chunk of a longer row

if triton is not None:

    @triton.jit
    def _quantize_rows(x, stride, out, scales, cols, FP8_MAX: tl.constexpr, MIN_AMAX: tl.constexpr,
                       BLOCK: tl.constexpr, WHOLE: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        src = x + row * stride
        dst = out + row * cols
        offs = tl.arange(0, BLOCK)
        if WHOLE:
            inside = offs < cols
            v = tl.load(src + offs, mask=inside, other=0.0).to(tl.float32)
            scale = tl.maximum(tl.max(tl.abs(v), 0), MIN_AMAX) * (1.0 / FP8_MAX)
            tl.store(scales + row, scale)
            q = tl.clamp(tl.math.div_rn(v, scale), -FP8_MAX, FP8_MAX)
            tl.store(dst + offs, q.to(tl.float8e4nv), mask=inside)
        else:
            amax = 0.0
            for start in range(0, cols, BLOCK):
                chunk = tl.load(src + start + offs, mask=start + offs < cols, other=0.0).to(tl.float32)
                amax = tl.maximum(amax, tl.max(tl.abs(chunk), 0))
            scale = tl.maximum(amax, MIN_AMAX) * (1.0 / FP8_MAX)
            tl.store(scales + row, scale)
            for start in range(0, cols, BLOCK):
                inside = start + offs < cols
                chunk = tl.load(src + start + offs, mask=inside, other=0.0).to(tl.float32)
                q = tl.clamp(tl.math.div_rn(chunk, scale), -FP8_MAX, FP8_MAX)
                tl.store(dst + start + offs, q.to(tl.float8e4nv), mask=inside)

    @triton.jit
    def _silu_mul_quantize(x, stride, out, scales, cols, FP8_MAX: tl.constexpr, MIN_AMAX: tl.constexpr,
                           BLOCK: tl.constexpr):
        # a row of [gate | up] (2 x cols) -> silu(gate) * up, rounded to the activations' type as the
        # unfused kernel's output is, then quantized as _quantize_rows does: the row stays in registers.
        # The quantization is written out here and in _norm_quantize: as a shared @triton.jit function
        # it compiled to 120 registers instead of 85 on sm90 (Triton 3.6), a program fewer an SM
        row = tl.program_id(0).to(tl.int64)
        src = x + row * stride
        offs = tl.arange(0, BLOCK)
        inside = offs < cols
        gate = tl.load(src + offs, mask=inside, other=0.0).to(tl.float32)
        up = tl.load(src + cols + offs, mask=inside, other=0.0).to(tl.float32)
        h = (gate / (1.0 + tl.exp(-gate)) * up).to(x.dtype.element_ty).to(tl.float32)
        scale = tl.maximum(tl.max(tl.abs(h), 0), MIN_AMAX) * (1.0 / FP8_MAX)
        tl.store(scales + row, scale)
        q = tl.clamp(tl.math.div_rn(h, scale), -FP8_MAX, FP8_MAX)
        tl.store(out + row * cols + offs, q.to(tl.float8e4nv), mask=inside)

    def _outputs(rows: int, cols: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """A quantizing kernel's outputs: e4m3 values [rows, cols] and float32 scales [rows, 1]."""
        return (torch.empty(rows, cols, dtype=torch.float8_e4m3fn, device=device),
                torch.empty(rows, 1, dtype=torch.float32, device=device))

    def _warps(block: int) -> int:
        return 4 if block <= 2048 else 8

    def silu_mul_quantize_cuda(gate_up: torch.Tensor, fp8_max: float,
                               min_amax: float) -> tuple[torch.Tensor, torch.Tensor] | None:
        """gate_up [T, 2W] (CUDA, half types, [gate | up]) -> (e4m3 [T, W], float32 scales [T, 1]) of
        silu(gate) * up, without writing that product; None where a row is past WHOLE_ROW."""
        rows, width = gate_up.shape
        cols = width // 2
        if cols > WHOLE_ROW:
            return None
        if gate_up.stride(-1) != 1:
            gate_up = gate_up.contiguous()
        out, scales = _outputs(rows, cols, gate_up.device)
        block = triton.next_power_of_2(cols)
        if rows:
            _silu_mul_quantize[(rows,)](gate_up, gate_up.stride(0), out, scales, cols, FP8_MAX=fp8_max,
                                        MIN_AMAX=min_amax, BLOCK=block, num_warps=_warps(block))
        return out, scales

    @triton.jit
    def _norm_quantize(x, x_stride, res, res_stride, w, out, scales, cols, eps, FP8_MAX: tl.constexpr,
                       MIN_AMAX: tl.constexpr, BLOCK: tl.constexpr, RESIDUAL: tl.constexpr):
        # a row of x (plus the residual, which takes the sum) -> RMSNorm as RMSNorm.reference rounds it (the
        # sum, the normalized row and its product with the weight each to the activations' type), then
        # quantized as _quantize_rows does: the row stays in registers
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        inside = offs < cols
        # in float32, each result rounded to the activations' type: what torch's half-type arithmetic does
        kind: tl.constexpr = x.dtype.element_ty
        v = tl.load(x + row * x_stride + offs, mask=inside, other=0.0).to(tl.float32)
        if RESIDUAL:
            v = (v + tl.load(res + row * res_stride + offs, mask=inside, other=0.0).to(tl.float32)).to(kind)
            tl.store(res + row * res_stride + offs, v, mask=inside)
            v = v.to(tl.float32)
        h = (v * tl.math.rsqrt(tl.sum(v * v, 0) / cols + eps)).to(kind).to(tl.float32)
        h = (h * tl.load(w + offs, mask=inside, other=0.0).to(tl.float32)).to(kind).to(tl.float32)
        scale = tl.maximum(tl.max(tl.abs(h), 0), MIN_AMAX) * (1.0 / FP8_MAX)
        tl.store(scales + row, scale)
        q = tl.clamp(tl.math.div_rn(h, scale), -FP8_MAX, FP8_MAX)
        tl.store(out + row * cols + offs, q.to(tl.float8e4nv), mask=inside)

    def norm_quantize_cuda(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                           fp8_max: float, min_amax: float) -> tuple[torch.Tensor, torch.Tensor] | None:
        """RMSNorm of x [T, K] (CUDA, half types; after adding `residual` [T, K], which takes the sum in
        place) quantized per row -> (e4m3 [T, K], float32 scales [T, 1]); None where a row is past
        WHOLE_ROW or a last dimension is strided."""
        rows, cols = x.shape
        if cols > WHOLE_ROW or x.stride(-1) != 1 or (residual is not None and residual.stride(-1) != 1):
            return None
        out, scales = _outputs(rows, cols, x.device)
        block = triton.next_power_of_2(cols)
        if rows:
            res = x if residual is None else residual
            _norm_quantize[(rows,)](x, x.stride(0), res, res.stride(0), weight, out, scales, cols, eps,
                                    FP8_MAX=fp8_max, MIN_AMAX=min_amax, BLOCK=block, RESIDUAL=residual is not None,
                                    num_warps=_warps(block))
        return out, scales

    def quantize_rows_cuda(x: torch.Tensor, fp8_max: float, min_amax: float) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, K] (CUDA, any float type) -> (e4m3 [T, K] row-major, float32 scales [T, 1])."""
        if x.stride(-1) != 1:
            x = x.contiguous()
        rows, cols = x.shape
        out, scales = _outputs(rows, cols, x.device)
        whole = cols <= WHOLE_ROW
        block = triton.next_power_of_2(cols) if whole else BLOCK
        if rows:
            _quantize_rows[(rows,)](x, x.stride(0), out, scales, cols, FP8_MAX=fp8_max, MIN_AMAX=min_amax,
                                    BLOCK=block, WHOLE=whole, num_warps=_warps(block))
        return out, scales
else:
    quantize_rows_cuda = silu_mul_quantize_cuda = norm_quantize_cuda = None
