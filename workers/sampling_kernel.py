"""Gumbel-max sampling in one pass over the logits (Triton, CUDA), for batches without top-p,
top-k or alternatives: per row, the token of argmax(logits / T + gumbel) (argmax(logits) for
greedy rows) and its logprob, log_softmax(logits) (or, processed, log_softmax(logits / T)) at that
token, from an online logsumexp.

The pass works on slices of the vocabulary: each tensor-parallel rank reduces the logits of its
own slice to four numbers a row (`sample_partials`), and `combine` merges the slices' partials, so
only those cross ranks, never the logits. On one GPU the slice is the whole vocabulary. A rank's
slice may be cut further, a program a piece (`slices`), for more programs than rows: with one
program a row, 2,048 rows fill an H200 in 3.1 waves of 660 programs (5 an SM at 96 registers),
so the last wave runs a tenth full; `tools/bench_sampling.py` times the choices.

The unfused torch code in workers/sampling.py is the reference: the noise is the same hash of
(row key, vocab id), so both pick the same tokens up to float rounding of near ties.
`sample_partials` is None where Triton is missing (CPU builds of torch).
"""

from __future__ import annotations

import os

import torch

from workers.sampling import MIN_LOGPROB

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: sampling.py uses the torch code
    triton = None

BLOCK = 4096
# programs a row (see above): 3 measured best on the H200 (tools/bench_sampling.py, 2,048 rows x 128,256
# logits: 0.549 ms at temperature 0.6 and 0.242 ms greedy, against 0.578 and 0.256 with one)
SLICES = 3
WARPS = 4
# the interpreter runs no inline PTX: there the kernel takes tl.log2, tl.exp2 and the exact division
FAST_LOG = os.environ.get("TRITON_INTERPRET") != "1"

if triton is not None:
    LOG2E = tl.constexpr(1.4426950408889634)
    LN2 = tl.constexpr(0.6931471805599453)

    @triton.jit
    def _mix32(x):
        # lowbias32 on uint32 (wrapping multiplies), as sampling._mix32 does on masked int64
        x = x ^ (x >> 16)
        x = x * 0x7FEB352D
        x = x ^ (x >> 15)
        x = x * 0x846CA68B
        return x ^ (x >> 16)

    @triton.jit
    def _fast(x, op: tl.constexpr):
        return tl.inline_asm_elementwise(op, "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1)

    # lg2.approx and ex2.approx (one special-function op each, where libdevice's log2f is ~25
    # instructions): lg2 within 2 ulp where |log2 x| >= 1 and 2**-22 absolute for x in [0.5, 2], ex2
    # within 2 ulp. ftz drops the denormal fix-ups: every lg2 argument here is 2**-24 or more, and an
    # exp2 term below 2**-126 of the running maximum adds nothing to a sum
    @triton.jit
    def _lg2(x, FAST: tl.constexpr):
        return _fast(x, "lg2.approx.ftz.f32 $0, $1;") if FAST else tl.log2(x)

    @triton.jit
    def _exp2(x, FAST: tl.constexpr):
        return _fast(x, "ex2.approx.ftz.f32 $0, $1;") if FAST else tl.exp2(x)

    @triton.jit
    def _div(x, y, FAST: tl.constexpr):
        # div.approx: a reciprocal and a product (2 ulp, as the default division; no range fix-ups: y is
        # in [1, 2] here)
        if FAST:
            return tl.inline_asm_elementwise("div.approx.ftz.f32 $0, $1, $2;", "=f,f,f", [x, y], dtype=tl.float32,
                                             is_pure=True, pack=1)
        else:
            return x / y

    @triton.jit
    def _noise2(h, FAST: tl.constexpr):
        # Gumbel noise -log(-log(u)) in base 2 and up to a constant: -log2(e / ln 2) = log2(e) * gumbel +
        # log2(ln 2), e = -log(u), u = odd / 2**24 from the hash's top 23 bits, as sampling.gumbel. Where
        # u < 1/2, e / ln 2 = -log2(u) by the approximate log (at least 1, so 2 ulp of it); for u >= 1/2,
        # where an absolute error would swamp e (down to 2**-24), the series 2 atanh(z), z = v / (2 - v)
        # <= 1/3 of v = 1 - u (exact there), to ~1e-7 relative. The outer log's argument is at least
        # 2**-24: its error is ~2**-22 absolute near 1 and 2 ulp elsewhere, a few 1e-6 at most
        k = h >> 9
        u = (k * 2 + 1).to(tl.float32) * (1.0 / 16777216.0)
        v = 1.0 - u
        z = _div(v, 2.0 - v, FAST)
        z2 = z * z
        c: tl.constexpr = 2.0 * LOG2E  # 2 atanh(z) / ln 2, the factor in the series' terms
        series = c / 13.0
        series = series * z2 + c / 11.0
        series = series * z2 + c / 9.0
        series = series * z2 + c / 7.0
        series = series * z2 + c / 5.0
        series = series * z2 + c / 3.0
        series = series * z2 + c
        e2 = tl.where(k < 0x400000, -_lg2(u, FAST), z * series)
        return -_lg2(e2, FAST)

    @triton.jit
    def _sample_rows(logits, stride, vocab, span, offset, temperature, keys, out,
                     RANDOM: tl.constexpr, RAW: tl.constexpr, BLOCK: tl.constexpr, FAST: tl.constexpr):
        # in base 2 throughout: scores are log2(e) x (logits / T + gumbel) up to a constant, which keeps
        # their argmax; the log-sum-exp is converted back at the end. Program (row, piece) reads ids
        # piece x span .. of its row (span a multiple of BLOCK); an empty piece reports -inf scores
        row = tl.program_id(0)
        piece = tl.program_id(1)
        rows = tl.num_programs(0)
        lo = piece * span
        hi = tl.minimum(lo + span, vocab)
        t = tl.load(temperature + row)
        greedy = t <= 0
        scale = LOG2E / tl.where(greedy, 1.0, t)
        key = tl.load(keys + row).to(tl.uint32)
        base = logits + row.to(tl.int64) * stride
        offs = tl.arange(0, BLOCK)
        run_max = -float("inf")
        run_sum = 0.0
        best = -float("inf")
        best_id = lo
        for start in range(lo, hi, BLOCK):
            ids = start + offs
            inside = ids < hi
            raw = tl.load(base + ids, mask=inside, other=-float("inf")).to(tl.float32)
            x = raw * scale
            lse_in = raw * LOG2E if RAW else x  # the reported distribution: the model's own, or the sampled one
            new_max = tl.maximum(run_max, tl.max(lse_in, 0))
            run_sum = run_sum * _exp2(run_max - new_max, FAST) + tl.sum(_exp2(lse_in - new_max, FAST), 0)
            run_max = new_max
            score = x
            if RANDOM:
                h = _mix32(key + (offset + ids).to(tl.uint32) * 0xC2B2AE3D)
                score = tl.where(greedy, x, x + _noise2(h, FAST))
            score = tl.where(inside, score, -float("inf"))
            block_best, block_id = tl.max(score, 0, return_indices=True, return_indices_tie_break_left=True)
            if block_best > best:  # strictly greater: the first maximum wins, as torch.argmax
                best = block_best
                best_id = start + block_id
        chosen = tl.load(base + best_id, mask=best_id < vocab, other=0.0).to(tl.float32)
        if not RAW:
            chosen = chosen / tl.where(greedy, 1.0, t)
        out_row = out + (piece * rows + row) * 4
        tl.store(out_row, best)
        tl.store(out_row + 1, (offset + best_id).to(tl.float32))
        tl.store(out_row + 2, (run_max + tl.log2(run_sum)) * LN2)
        tl.store(out_row + 3, chosen)

    def sample_partials(logits: torch.Tensor, temperature: torch.Tensor, keys: torch.Tensor, random: bool,
                        offset: int = 0, raw: bool = True, slices: int = SLICES,
                        warps: int = WARPS) -> torch.Tensor:
        """logits [rows, V] of vocab ids offset .. offset + V - 1 (contiguous last dim), temperature
        [rows] float32, keys [rows] int64 from sampling.row_keys. Returns [slices, rows, 4] float32,
        the V ids cut into `slices` pieces of whole blocks in id order (the same count on every
        tensor-parallel rank, whatever its V; a piece past the end is empty: -inf score and
        logsumexp), for each: the best score of the piece, its vocab id (exact in float32 below
        2**24), the piece's logsumexp of the reported logits (raw: the logits; else logits / T), and
        the best token's reported logit."""
        rows, vocab = logits.shape
        assert offset + vocab < 2**24, "vocab ids travel as float32"
        span = triton.cdiv(triton.cdiv(max(vocab, 1), BLOCK), slices) * BLOCK  # pieces of whole blocks
        out = torch.empty(slices, rows, 4, dtype=torch.float32, device=logits.device)
        if rows:
            _sample_rows[(rows, slices)](logits, logits.stride(0), vocab, span, offset, temperature, keys, out,
                                         RANDOM=random, RAW=raw, BLOCK=BLOCK, FAST=FAST_LOG, num_warps=warps)
        return out
else:
    sample_partials = None


def combine(parts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """parts [slices, rows, 4] from sample_partials over slices of the vocabulary in id order ->
    tokens [rows] int64 and their logprobs [rows] float32."""
    best, ids, lse, chosen = parts.unbind(-1)
    win = best.argmax(0, keepdim=True)  # the first maximum: the lowest id, as one argmax over the vocabulary
    logprob = chosen.gather(0, win)[0] - torch.logsumexp(lse, 0)
    return ids.gather(0, win)[0].long(), logprob.clamp(min=MIN_LOGPROB)


def fused_sample(logits: torch.Tensor, temperature: torch.Tensor, keys: torch.Tensor, random: bool,
                 raw: bool = True, slices: int = SLICES, warps: int = WARPS):
    """The whole vocabulary's logits [rows, V] -> tokens [rows] int64 and their logprobs [rows] float32."""
    return combine(sample_partials(logits, temperature, keys, random, raw=raw, slices=slices, warps=warps))
