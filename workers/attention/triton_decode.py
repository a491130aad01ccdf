"""Decode attention over the paged KV cache in Triton: one query token a row, every query head of a
row in one program (or, `per_kv_head`, the query heads of one kv head).

Why its own kernel: decode attention only streams the cache, so its speed is the bytes in flight.
A page of toka's NHD cache holds K (then V) of all its tokens and kv heads contiguously (16 tokens x
8 heads x 64 dims of bf16 = 16 KiB on the Llama-3.2-1B shape), so a program that takes a whole row
loads whole pages: each K tile is [pages x tokens x kv heads, head_dim] read straight from memory,
multiplied by all the row's query heads at once ([heads, head_dim] @ tile^T on tensor cores) with
the pairs of a query head and another kv head masked out. The masked products cost kv_heads times
the useful multiplies, which stays far below the bandwidth's time (64 FLOPs a byte on that shape
against the H200's ~180). Measured on an H200: 0.43 ms a layer of 2,048 sharegpt-like rows, 89 %
of the copy bandwidth, against 0.58 ms (67 %) for FlashInfer's CUDA-core kernel
(docs/performance.md). The probabilities are rounded to the query type for the product with V,
as tensor-core attention kernels do (FlashInfer's prefill kernels too); over FP8 pages to float16.

A row's pages are split in chunks of CHUNK_PAGES (a work item each, so long rows spread over the
SMs); rows of one chunk write their output directly, others write a float32 partial and its
log-sum-exp, which a second kernel merges. The work list (item -> row, chunk) is built on the host
with the step's other metadata. A step's own list launches a program an item; a CUDA graph's list
has a fixed bound that covers any split of the whole cache (2,048 rows + 15,070 items on the H200's
cache), so its grid is a program a row (eight an SM at least), each looping over the items past the
grid, and a replay launches no programs that find nothing to do.

`per_kv_head` takes a second kernel of the same arithmetic: a program per (item, kv head), its
query heads (4 on that shape, in a tile of 16 rows) against that head's [tokens, head_dim] of each
page. It loads 1/kv_heads of a page a program and multiplies 16 query rows where the first kernel
multiplies all of them against every kv head: on sm90 it compiles to ~30 % fewer instructions a page
over FP8 pages, whose conversions make the first kernel bound by its instructions rather than by
the bytes, and ran 3-12 % faster there on an H200 (tools/gpu.py tune times both).

An FP8 cache is read as it is: pages are converted to float16 in registers (exactly; the queries
too), K's scale folds into the softmax scale and V's into the output. Log-sum-exps are base 2, as
FlashInfer's are, so Hydragen can merge them with its prefix attention's.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from workers.attention import cumsum0
from workers.staging import RING

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU builds of torch: the work list below still builds, the kernels do not
    triton = None

# pages of one work item (256 tokens at 16 a page) and a program's warps and pipeline stages: on an
# H200 (tools/gpu.py tune, 2,048 rows, 16 layers of a 100 GiB cache, 2026-12-02) 2:2:16 was the fastest
# setting of the kernel of all kv heads at every length it timed: over bf16 pages 0.433 ms a layer at
# sharegpt-like lengths against 0.448 for 4:2:32, 1.07 against 1.09 at 900-1,156 tokens (two warps
# take 255 registers a thread, so four programs share an SM where two of four warps did). Over FP8
# pages the kernel of a program per kv head (one warp) is the default: 0.411 against 0.424 ms at
# sharegpt-like lengths, 0.152 against 0.173 over Hydragen's own pages (1-256), 1.00 either way at
# 900-1,156; over bf16 pages it loses at sharegpt-like lengths (0.455) and wins on Hydragen's own pages
# (0.160 against 0.168), where the attention backend asks for it
CHUNK_PAGES = 16
WARPS = 2
HEAD_WARPS = 1  # per_kv_head's
STAGES = 2
PAGES_A_TILE = 1  # pages loaded and multiplied at once
LAZY_SLACK = 8.0  # lazy_rescale's: how far (base 2) scores may pass the reference maximum


def supports(kv_heads: int, head_dim: int, page_size: int) -> bool:
    """Whether the kernel builds for this shape: its tiles are powers of two."""
    return triton is not None and all(n & (n - 1) == 0 for n in (kv_heads, head_dim, page_size)) and head_dim >= 16


if triton is not None:

    _TL = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}
    _SLACK = tl.constexpr(LAZY_SLACK)

    # The work list's parts and the page lists are views at offsets that change from step to step:
    # specialized on their 16-byte alignment, each new combination would compile while serving
    _VIEWS = ["work_row", "work_chunk", "n_work", "page_indptr", "page_indices", "kv_lens"]

    @triton.jit
    def _finish(Out, Lse, PartO, PartLse, row, w, pages, m, s_sum, acc, v_scale, o_row_stride, o_head_stride, h, d,
                mine, HQ: tl.constexpr, HQ_PAD: tl.constexpr, D: tl.constexpr, CHUNK: tl.constexpr,
                WRITE_LSE: tl.constexpr):
        # a whole row's output (and log-sum-exp), or a chunk's partial for the merge, of the query heads h
        # where `mine` (the tile's other rows are padding, or another program's)
        if tl.cdiv(pages, CHUNK) == 1:
            out = acc / s_sum[:, None] * v_scale
            tl.store(Out + row * o_row_stride + h[:, None] * o_head_stride + d[None, :], out.to(Out.dtype.element_ty),
                     mask=mine[:, None])
            if WRITE_LSE:
                tl.store(Lse + row * HQ + h, m + tl.log2(s_sum), mask=mine)
        else:
            tl.store(PartO + w * HQ_PAD * D + h[:, None] * D + d[None, :], acc / s_sum[:, None], mask=mine[:, None])
            tl.store(PartLse + w * HQ_PAD + h, m + tl.log2(s_sum), mask=mine)

    @triton.jit
    def _item(w, work_row, work_chunk, page_indptr, kv_lens, CHUNK: tl.constexpr):
        # work item w: its row, the row's pages lo .. hi in the page list and KV length, and the item's
        # pages first .. end
        row = tl.load(work_row + w).to(tl.int64)
        lo = tl.load(page_indptr + row)
        hi = tl.load(page_indptr + row + 1)
        first = lo + tl.load(work_chunk + w) * CHUNK
        return row, lo, hi, tl.load(kv_lens + row), first, tl.minimum(first + CHUNK, hi)

    @triton.jit
    def _tile(KV, page_indices, idx, end, rows, d, page_stride, v_offset, D: tl.constexpr, DOT: tl.constexpr):
        # K and V of the tile's rows: page idx's row `rows` of (token, kv head), in the products' type;
        # pages at end or past it read as zeros
        live = idx < end
        page = tl.load(page_indices + idx, mask=live, other=0).to(tl.int64)
        at = page * page_stride + rows * D
        k = tl.load(KV + at[:, None] + d[None, :], mask=live[:, None], other=0.0).to(DOT)
        return k, tl.load(KV + v_offset + at[:, None] + d[None, :], mask=live[:, None], other=0.0).to(DOT)

    @triton.jit
    def _attend(q, k, v, keep, qk_scale, m, s_sum, acc, DOT: tl.constexpr, LAZY: tl.constexpr):
        # one tile of keys and values into the online softmax of q's rows, the scores where not `keep`
        # masked out (a chunk's first tile keeps a key for every row, so the maximum stays finite).
        # LAZY: the rows' reference maximum moves only when some row's scores pass it by more than
        # LAZY_SLACK (base 2), so most tiles skip rescaling the accumulator (a multiply an element of
        # it); the probabilities then stay below 2**LAZY_SLACK, which float16 and bf16 hold
        s = tl.where(keep, tl.dot(q, tl.trans(k)) * qk_scale, float("-inf"))
        m_tile = tl.max(s, 1)
        if LAZY:
            if tl.max(m_tile - m, 0) > _SLACK:
                m_new = tl.maximum(m, m_tile)
                alpha = tl.exp2(m - m_new)
                s_sum = s_sum * alpha
                acc = acc * alpha[:, None]
                m = m_new
            prob = tl.exp2(s - m[:, None])
            return m, s_sum + tl.sum(prob, 1), acc + tl.dot(prob.to(DOT), v)
        m_new = tl.maximum(m, m_tile)
        alpha = tl.exp2(m - m_new)
        prob = tl.exp2(s - m_new[:, None])
        return m_new, s_sum * alpha + tl.sum(prob, 1), acc * alpha[:, None] + tl.dot(prob.to(DOT), v)

    @triton.jit(do_not_specialize=_VIEWS)
    def _chunk_kernel(Q, KV, Out, Lse, PartO, PartLse, work_row, work_chunk, n_work, page_indptr, page_indices,
                      kv_lens, qk_scale, v_scale, q_row_stride, q_head_stride, o_row_stride, o_head_stride,
                      page_stride, v_offset,
                      HQ: tl.constexpr, HQ_PAD: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, PS: tl.constexpr,
                      PB: tl.constexpr, CHUNK: tl.constexpr, WRITE_LSE: tl.constexpr, DOT: tl.constexpr,
                      LAZY: tl.constexpr):
        h = tl.arange(0, HQ_PAD)
        d = tl.arange(0, D)
        # tile row i: page i // (PS * HKV) of the tile, then token and kv head in NHD order
        N: tl.constexpr = PB * PS * HKV
        i = tl.arange(0, N)
        tile_page = i // (PS * HKV)
        within = i % (PS * HKV)
        # padding query heads read kv head 0, so that their (unused) softmax stays finite
        kv_head = tl.where(h < HQ, h // (HQ // HKV), 0)
        pair = kv_head[:, None] == (within % HKV)[None, :]
        q_heads = h[:, None] * q_head_stride + d[None, :]
        # a program per item of the step (its own list), or per row of a graph's, looping over the items
        # past the grid: a graph's bound covers any split of the whole cache, most of it past any step
        for w in range(tl.program_id(0), tl.load(n_work), tl.num_programs(0)):
            row, lo, hi, kv_len, first, end = _item(w, work_row, work_chunk, page_indptr, kv_lens, CHUNK)
            q = tl.load(Q + row * q_row_stride + q_heads, mask=(h < HQ)[:, None], other=0.0).to(DOT)
            m = tl.full([HQ_PAD], float("-inf"), tl.float32)
            s_sum = tl.zeros([HQ_PAD], tl.float32)
            acc = tl.zeros([HQ_PAD, D], tl.float32)
            for p in range(first, end, PB):
                idx = p + tile_page
                k, v = _tile(KV, page_indices, idx, end, within, d, page_stride, v_offset, D, DOT)
                pos = (idx - lo) * PS + within // HKV
                m, s_sum, acc = _attend(q, k, v, pair & (pos < kv_len)[None, :], qk_scale, m, s_sum, acc, DOT, LAZY)
            _finish(Out, Lse, PartO, PartLse, row, w, hi - lo, m, s_sum, acc, v_scale, o_row_stride, o_head_stride,
                    h, d, h < HQ, HQ, HQ_PAD, D, CHUNK, WRITE_LSE)

    @triton.jit(do_not_specialize=_VIEWS)
    def _head_kernel(Q, KV, Out, Lse, PartO, PartLse, work_row, work_chunk, n_work, page_indptr, page_indices,
                     kv_lens, qk_scale, v_scale, q_row_stride, q_head_stride, o_row_stride, o_head_stride,
                     page_stride, v_offset,
                     HQ: tl.constexpr, HQ_PAD: tl.constexpr, GP: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
                     PS: tl.constexpr, PB: tl.constexpr, CHUNK: tl.constexpr, WRITE_LSE: tl.constexpr,
                     DOT: tl.constexpr, LAZY: tl.constexpr):
        # a program per (item, kv head): the kv head's query heads (a tile of GP rows, G of them live)
        # against that head's K and V of PB pages at a time, [PB x PS, D] each
        g = tl.program_id(1)
        G: tl.constexpr = HQ // HKV
        j = tl.arange(0, GP)
        h = g * G + j
        mine = j < G
        d = tl.arange(0, D)
        N: tl.constexpr = PB * PS
        t = tl.arange(0, N)
        tile_page = t // PS
        token = (t % PS) * HKV + g  # the token's row of (token, kv head) in an NHD page
        q_heads = h[:, None] * q_head_stride + d[None, :]
        for w in range(tl.program_id(0), tl.load(n_work), tl.num_programs(0)):
            row, lo, hi, kv_len, first, end = _item(w, work_row, work_chunk, page_indptr, kv_lens, CHUNK)
            q = tl.load(Q + row * q_row_stride + q_heads, mask=mine[:, None], other=0.0).to(DOT)
            m = tl.full([GP], float("-inf"), tl.float32)
            s_sum = tl.zeros([GP], tl.float32)
            acc = tl.zeros([GP, D], tl.float32)
            for p in range(first, end, PB):
                idx = p + tile_page
                k, v = _tile(KV, page_indices, idx, end, token, d, page_stride, v_offset, D, DOT)
                pos = (idx - lo) * PS + t % PS
                m, s_sum, acc = _attend(q, k, v, (pos < kv_len)[None, :], qk_scale, m, s_sum, acc, DOT, LAZY)
            _finish(Out, Lse, PartO, PartLse, row, w, hi - lo, m, s_sum, acc, v_scale, o_row_stride, o_head_stride,
                    h, d, mine, HQ, HQ_PAD, D, CHUNK, WRITE_LSE)


    @triton.jit(do_not_specialize=["work_start", "page_indptr"])
    def _merge_kernel(Out, Lse, PartO, PartLse, work_start, page_indptr, v_scale, o_row_stride, o_head_stride,
                      HQ: tl.constexpr, HQ_PAD: tl.constexpr, D: tl.constexpr, CHUNK: tl.constexpr,
                      WRITE_LSE: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        n = tl.cdiv(tl.load(page_indptr + row + 1) - tl.load(page_indptr + row), CHUNK)
        if n == 1:
            return
        start = tl.load(work_start + row)
        h = tl.arange(0, HQ_PAD)
        d = tl.arange(0, D)
        m = tl.full([HQ_PAD], float("-inf"), tl.float32)
        s_sum = tl.zeros([HQ_PAD], tl.float32)
        acc = tl.zeros([HQ_PAD, D], tl.float32)
        for c in range(n):
            w = start + c
            lse = tl.load(PartLse + w * HQ_PAD + h)
            part = tl.load(PartO + w * HQ_PAD * D + h[:, None] * D + d[None, :])
            m_new = tl.maximum(m, lse)
            alpha = tl.exp2(m - m_new)
            beta = tl.exp2(lse - m_new)
            acc = acc * alpha[:, None] + part * beta[:, None]
            s_sum = s_sum * alpha + beta
            m = m_new
        out = acc / s_sum[:, None] * v_scale
        tl.store(Out + row * o_row_stride + h[:, None] * o_head_stride + d[None, :], out.to(Out.dtype.element_ty),
                 mask=(h < HQ)[:, None])
        if WRITE_LSE:
            tl.store(Lse + row * HQ + h, m + tl.log2(s_sum), mask=h < HQ)


@functools.cache
def sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


class WorkList:
    """A step's decode rows as work items, in one int32 device buffer filled by one copy: each item's
    row and chunk (of `chunk` pages of the row), each row's first item, the item count, and the rows'
    page offsets (into the page list the kernel is given) and KV lengths. `bound` items (a graph's
    fixed grid) or the step's."""

    def __init__(self, rows: int, bound: int, device, chunk: int = CHUNK_PAGES, own: bool = False,
                 split: bool = True):
        self.rows, self.bound, self.chunk = rows, bound, chunk
        # `own`: a step's own list of exactly `bound` items, which a copy is about to write whole (no
        # memset to wait on before it), a program an item. A graph's list is read by a program a row,
        # or eight an SM (two waves of the four two-warp programs an SM holds) where rows are few, so
        # that a few rows split in many items still spread over the SMs; each loops over the items past the grid. Its
        # rows may split (a merge to run); an own list's where one is longer than a chunk (`split`)
        self.split = split or not own
        self.programs = bound if own else min(bound, max(rows, 8 * sm_count(torch.device(device))))
        alloc = torch.empty if own else torch.zeros
        self.buffer = alloc(2 * bound + 3 * rows + 3, dtype=torch.int32, device=device)
        parts = torch.split(self.buffer, [bound, bound, rows + 1, 1, rows + 1, rows])
        self.item_row, self.item_chunk, self.row_start, self.count, self.page_indptr, self.kv_lens = parts

    @staticmethod
    def chunks_of(pages: np.ndarray, chunk: int = CHUNK_PAGES) -> np.ndarray:
        """Work items a row for rows of these page counts."""
        return (pages + chunk - 1) // chunk

    @staticmethod
    def host(pages: np.ndarray, kv_lens: np.ndarray, bound: int, chunk: int = CHUNK_PAGES) -> np.ndarray:
        """The buffer's contents (int32, on the host) for rows of these page counts and KV lengths."""
        per_row = WorkList.chunks_of(pages, chunk)
        start = cumsum0(per_row)
        items, rows = int(start[-1]), len(pages)
        if items > bound:
            raise ValueError(f"{items} decode work items; the buffer holds {bound}")
        item_row = np.repeat(np.arange(rows), per_row)
        out = np.zeros(2 * bound + 3 * rows + 3, dtype=np.int32)
        out[:items] = item_row
        out[bound : bound + items] = np.arange(items) - start[item_row]
        at = 2 * bound
        out[at : at + rows + 1] = start
        out[at + rows + 1] = items
        out[at + rows + 2 : at + 2 * rows + 3] = cumsum0(pages)
        out[at + 2 * rows + 3 :] = kv_lens
        return out

    @classmethod
    def of(cls, pages: np.ndarray, kv_lens: np.ndarray, device=None, into: WorkList | None = None,
           chunk: int = CHUNK_PAGES) -> WorkList:
        """The work list of these rows on the device: copied into `into` (a graph's, whose buffer the
        replays read) or into a new one on `device` sized to the step, of `chunk` pages an item."""
        if into is None:
            into = cls(len(pages), int(cls.chunks_of(pages, chunk).sum()), device, chunk=chunk, own=True,
                       split=bool((pages > chunk).any()))
        host = cls.host(pages, kv_lens, into.bound, into.chunk)
        into.buffer.copy_(RING.host(host) if into.buffer.is_cuda else torch.from_numpy(host), non_blocking=True)
        return into

    @staticmethod
    def bound_for(rows: int, pages: int, chunk: int = CHUNK_PAGES) -> int:
        """The most items `rows` rows holding `pages` pages in all can make."""
        return rows + pages // chunk


def decode(q: torch.Tensor, kv: torch.Tensor, work: WorkList, page_indices: torch.Tensor, k_scale: float = 1.0,
           v_scale: float = 1.0, return_lse: bool = False, pages_a_tile: int = PAGES_A_TILE,
           num_warps: int | None = None, num_stages: int = STAGES, out: torch.Tensor | None = None,
           max_registers: int | None = None, per_kv_head: bool | None = None, lazy_rescale: bool = False):
    """Attention of q ([rows, heads, head_dim], one token a row; any strides but the last) over each
    row's pages (the work list's offsets into page_indices, int32) of one layer's cache kv ([pages,
    2, page_size, kv_heads, head_dim]), its K and V stored divided by k_scale and v_scale. Returns
    out [rows, heads, head_dim] in q's type (written into `out` where given: any strides but the
    last), and with return_lse the base-2 log-sum-exps [rows, heads] (float32). `max_registers` caps
    the registers a thread (on sm90 the kernel of all kv heads takes 232-249 at four warps, 255 at
    two; the per-kv-head one 126 at one). `per_kv_head` runs the kernel of a program per kv head
    (above), by default over FP8 pages; `num_warps` is by default the kernel's (WARPS, HEAD_WARPS).
    `lazy_rescale` rescales the accumulator only where the running maximum grows by more than
    LAZY_SLACK (fewer instructions a page; tools/bench_attention.py's `lazy` times it)."""
    rows, hq, dim = q.shape
    _, _, ps, hkv, _ = kv.shape
    if per_kv_head is None:
        per_kv_head = kv.dtype == torch.float8_e4m3fn
    num_warps = num_warps or (HEAD_WARPS if per_kv_head else WARPS)
    hq_pad = max(16, triton.next_power_of_2(hq))  # tensor-core tiles have 16 rows or more
    if out is None:
        out = torch.empty(rows, hq, dim, dtype=q.dtype, device=q.device)
    lse = torch.empty(rows, hq, dtype=torch.float32, device=q.device) if return_lse else out
    # the partials of rows split over items (none written where no row is: then any tensor serves)
    part_o = torch.empty(work.bound, hq_pad, dim, dtype=torch.float32, device=q.device) if work.split else out
    part_lse = torch.empty(work.bound, hq_pad, dtype=torch.float32, device=q.device) if work.split else out
    qk_scale = dim**-0.5 * k_scale * math.log2(math.e)
    shape = dict(HQ=hq, HQ_PAD=hq_pad, D=dim, WRITE_LSE=return_lse)
    # the products' type: the queries' over bf16 pages; float16 over FP8 ones, which holds e4m3 exactly
    # (converting it is one instruction for two values, where bf16 takes another a value) and the
    # probabilities to 11 bits instead of 8
    dot = tl.float16 if kv.dtype == torch.float8_e4m3fn else _TL[q.dtype]
    strides = (q.stride(0), q.stride(1), out.stride(0), out.stride(1), kv.stride(0), kv.stride(1))
    launch = dict(num_warps=num_warps, num_stages=num_stages, **({"maxnreg": max_registers} if max_registers else {}))
    # tiles of 16 rows at least, tl.dot's smallest: 16 tokens of one kv head, or 16 (token, kv head) pairs
    pages_a_tile = max(pages_a_tile, triton.cdiv(16, ps if per_kv_head else ps * hkv))
    if work.chunk % pages_a_tile:  # a tile past an item's end would read the next item's pages unmasked
        raise ValueError(f"{pages_a_tile} pages a tile do not divide work items of {work.chunk} pages")
    if per_kv_head:
        _head_kernel[(work.programs, hkv)](
            q, kv, out, lse, part_o, part_lse, work.item_row, work.item_chunk, work.count, work.page_indptr,
            page_indices, work.kv_lens, qk_scale, v_scale, *strides, HKV=hkv, PS=ps,
            GP=max(16, triton.next_power_of_2(hq // hkv)), PB=pages_a_tile,
            CHUNK=work.chunk, DOT=dot, LAZY=lazy_rescale, **launch, **shape)
    else:
        _chunk_kernel[(work.programs,)](
            q, kv, out, lse, part_o, part_lse, work.item_row, work.item_chunk, work.count, work.page_indptr,
            page_indices, work.kv_lens, qk_scale, v_scale, *strides, HKV=hkv, PS=ps, PB=pages_a_tile,
            CHUNK=work.chunk, DOT=dot, LAZY=lazy_rescale, **launch, **shape)
    if work.split:  # a launch saved where every row fits one item (the host knows)
        _merge_kernel[(rows,)](out, lse, part_o, part_lse, work.row_start, work.page_indptr, v_scale,
                               out.stride(0), out.stride(1), CHUNK=work.chunk, **shape)
    return (out, lse) if return_lse else out
