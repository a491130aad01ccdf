"""toka's Triton decode kernel called directly, against float64 attention over the same pages: rows
of one page, of several pages and of several chunks (merged by the second kernel, which steps
without such rows skip), log-sum-exps, K and V scales, bf16 and FP8 pages. CUDA, or with
TRITON_INTERPRET=1 the CPU (float32 queries: the interpreter has no bf16 products)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from workers.attention import triton_decode
from workers.attention.triton_decode import CHUNK_PAGES, WorkList, decode

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(triton_decode.triton is None or not (torch.cuda.is_available() or INTERPRET),
                                reason="needs CUDA and Triton")
PS = 16


def reference(q, kv, pages, lens, page_list, k_scale, v_scale):
    """float64 attention of each row's query heads over its pages; out and base-2 log-sum-exps."""
    rows, hq, d = q.shape
    hkv = kv.shape[3]
    outs, lses, at = [], [], 0
    for r in range(rows):
        idx = page_list[at : at + pages[r]].long().cpu()
        at += pages[r]
        k = kv[idx, 0].double().cpu().reshape(-1, hkv, d)[: lens[r]].repeat_interleave(hq // hkv, 1) * k_scale
        v = kv[idx, 1].double().cpu().reshape(-1, hkv, d)[: lens[r]].repeat_interleave(hq // hkv, 1) * v_scale
        s = torch.einsum("hd,thd->ht", q[r].double().cpu(), k) * d**-0.5
        outs.append(torch.einsum("ht,thd->hd", s.softmax(-1), v))
        lses.append(torch.logsumexp(s, -1) / np.log(2))
    return torch.stack(outs), torch.stack(lses)


# the last two rows of the first set take 2 and 3 chunks (merged); the second's take one each (no merge runs)
LENS = {"split": [1, 5, 16, 40, CHUNK_PAGES * PS + 3, 2 * CHUNK_PAGES * PS + 100], "whole": [1, 5, 16, 40, 300]}


@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.float8_e4m3fn], ids=["bf16", "fp8"])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(8, 2, 32), (32, 8, 64)])
@pytest.mark.parametrize("rows", LENS)
@pytest.mark.parametrize("chunk", [CHUNK_PAGES, 8], ids=["chunks-default", "chunks-of-8"])
@pytest.mark.parametrize("graph", [False, True], ids=["own-list", "graph-list"])
@pytest.mark.parametrize("per_kv_head", [False, True], ids=["kv-heads-together", "kv-heads-apart"])
def test_decode_equals_float64_attention(kv_dtype, heads, kv_heads, head_dim, rows, chunk, graph, per_kv_head):
    check(kv_dtype, heads, kv_heads, head_dim, rows, chunk, graph, per_kv_head)


@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.float8_e4m3fn], ids=["bf16", "fp8"])
@pytest.mark.parametrize("per_kv_head", [False, True], ids=["kv-heads-together", "kv-heads-apart"])
@pytest.mark.parametrize("lazy", [False, True], ids=["rescaled", "lazy"])
@pytest.mark.parametrize("pages_a_tile", [1, 2], ids=["page-a-tile", "two-pages-a-tile"])
@pytest.mark.parametrize("rising", [False, True], ids=["scores-level", "scores-rising"])
def test_lazy_rescale_and_wider_tiles_equal_float64_attention(kv_dtype, per_kv_head, lazy, pages_a_tile, rising):
    # rising: each row's scores climb ~3 (base 2) a page, past LAZY_SLACK every few pages, so the lazy
    # kernel rescales mid-row as well as at a chunk's first tile
    check(kv_dtype, 32, 8, 64, "split", CHUNK_PAGES, False, per_kv_head, lazy, pages_a_tile, rising)


def check(kv_dtype, heads, kv_heads, head_dim, rows, chunk, graph, per_kv_head, lazy=False, pages_a_tile=1,
          rising=False):
    torch.manual_seed(0)
    lens = np.array(LENS[rows])
    pages = (lens + PS - 1) // PS
    total = int(pages.sum())
    cache = torch.randn(total + 3, 2, PS, kv_heads, head_dim) * 2
    page_list = torch.randperm(total + 3)[:total].to(torch.int32)
    q = torch.randn(len(lens), heads, head_dim)
    if rising:  # keys grow along the row in the queries' direction (all ones): scores rise with the position
        q = torch.ones_like(q) + 0.1 * q
        at = 0
        for n in pages:
            for i, page in enumerate(page_list[at : at + n].tolist()):
                cache[page, 0] = 0.5 * cache[page, 0] + (i * PS + torch.arange(PS))[:, None, None] / 32
            at += n
    cache = cache.to(torch.float32 if INTERPRET and kv_dtype == torch.bfloat16 else kv_dtype).to(DEVICE)
    page_list = page_list.to(DEVICE)
    q = q.to(torch.float32 if INTERPRET else torch.bfloat16).to(DEVICE)
    if graph:  # a graph's list: a bound past the step's items, and fewer programs than items (each loops)
        bound = WorkList.bound_for(len(lens), total + 40, chunk)
        work = WorkList.of(pages, lens, into=WorkList(len(lens), bound, DEVICE, chunk=chunk))
        work.programs = 2
    else:
        work = WorkList.of(pages, lens, DEVICE, chunk=chunk)
        assert work.split == bool((pages > chunk).any())
    k_scale, v_scale = 0.5, 3.0
    out, lse = decode(q, cache, work, page_list, k_scale, v_scale, return_lse=True, per_kv_head=per_kv_head,
                      lazy_rescale=lazy, pages_a_tile=pages_a_tile)
    want, want_lse = reference(q, cache, pages, lens, page_list, k_scale, v_scale)
    # On the GPU the queries and the output are bf16: the output's rounding alone is ~8e-4 of its norm
    # (2**-8 / sqrt(12) relative to a mantissa of 1.4 on average), and over FP8 pages the H200 gave
    # 1.02e-3 (float16 products); over bf16 pages K and the probabilities are bf16 too (5e-3). In
    # the interpreter the queries and output are float32: bf16 pages are exact products, FP8 pages'
    # values, queries and probabilities go through float16 (2**-11).
    rel = ((out.double().cpu() - want).norm() / want.norm()).item()
    bound = {True: 1e-4, False: 1e-3} if INTERPRET else {True: 5e-3, False: 2e-3}
    assert rel < bound[kv_dtype == torch.bfloat16], rel
    exact = INTERPRET and kv_dtype == torch.bfloat16  # float32 queries and products
    # log-sum-exps; the rising rows' reach ~100, where rounding the queries to the products' type
    # (float16 over FP8 pages: 2**-11 in the interpreter, whose queries are float32) moves them ~0.01
    rtol = 5e-4 if rising and not exact else 1e-5
    torch.testing.assert_close(lse.double().cpu(), want_lse, atol=1e-5 if exact else 1e-3, rtol=rtol)


def test_tiles_that_do_not_divide_an_item_are_refused():
    lens = np.array([40, 300])
    pages = (lens + PS - 1) // PS
    cache = torch.zeros(int(pages.sum()), 2, PS, 2, 32, device=DEVICE)
    q = torch.zeros(2, 8, 32, device=DEVICE)
    work = WorkList.of(pages, lens, DEVICE)
    with pytest.raises(ValueError, match="3 pages a tile do not divide work items of 16 pages"):
        decode(q, cache, work, torch.arange(int(pages.sum()), dtype=torch.int32, device=DEVICE), pages_a_tile=3)
