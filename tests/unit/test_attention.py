"""TorchAttention over a paged KVCache equals dense causal attention over each sequence's whole K/V
history (float64 reference), for batches that mix mid-sequence prefill chunks and decode rows, with
randomly assigned pages and GQA; and every new K/V lands in its own page and offset."""

from __future__ import annotations

import random

import pytest
import torch

from tests.helpers import batch_with_pages
from toka.arith import cdiv
from workers.attention import AttentionBackend, AttentionBatch, make_backend
from workers.attention.torch_ref import TorchAttention
from workers.kv_cache import KVCache
from workers.runner import ModelRunner

PAGE = 4


class Seqs:
    """Per-sequence full K/V/Q histories and randomly assigned pages."""

    def __init__(self, lengths, num_pages, kv_heads, heads, dim, layers, seed):
        g = torch.Generator().manual_seed(seed)
        rng = random.Random(seed)
        need = sum(cdiv(n, PAGE) for n in lengths)
        free = list(range(num_pages))
        rng.shuffle(free)
        assert need <= num_pages
        self.pages = []
        for n in lengths:
            k = cdiv(n, PAGE)
            self.pages.append([free.pop() for _ in range(k)])
        self.k = [[torch.randn(n, kv_heads, dim, generator=g) for n in lengths] for _ in range(layers)]
        self.v = [[torch.randn(n, kv_heads, dim, generator=g) for n in lengths] for _ in range(layers)]
        self.q = [[torch.randn(n, heads, dim, generator=g) for n in lengths] for _ in range(layers)]
        self.used = {p for ps in self.pages for p in ps}


def plan_for(rows, seqs: Seqs, num_prefill: int) -> AttentionBatch:
    """rows: (seq index, q_len, kv_len); prefill rows first. The AttentionBatch the runner's own
    code (on CPU) builds when each row's slot holds its sequence's pages."""
    runner = ModelRunner(None, None, max_seqs=len(rows), page_size=PAGE, device=torch.device("cpu"), scratch_page=0,
                         max_pages_per_seq=max(len(p) for p in seqs.pages))
    return batch_with_pages(runner, [q for _, q, _ in rows], [kv for _, _, kv in rows],
                            [seqs.pages[s] for s, _, _ in rows], num_prefill)


def reference(seqs: Seqs, layer: int, s: int, q_len: int, kv_len: int, heads: int, kv_heads: int) -> torch.Tensor:
    q = seqs.q[layer][s][kv_len - q_len : kv_len].double()
    k = seqs.k[layer][s][:kv_len].double()
    v = seqs.v[layer][s][:kv_len].double()
    group = heads // kv_heads
    k = k[:, torch.arange(heads) // group]  # head h reads kv head h // group
    v = v[:, torch.arange(heads) // group]
    scores = torch.einsum("qhd,khd->hqk", q, k) / q.shape[-1] ** 0.5
    qpos = torch.arange(kv_len - q_len, kv_len)
    mask = torch.arange(kv_len)[None, :] <= qpos[:, None]
    scores = scores.masked_fill(~mask[None], float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def run_step(attn, seqs, rows, num_prefill, layers, heads, kv_heads):
    batch = plan_for(rows, seqs, num_prefill)
    want_pos = torch.cat([torch.arange(kv - q, kv) for _, q, kv in rows])
    assert torch.equal(batch.positions, want_pos)
    assert batch.last_page_len.tolist() == [(kv - 1) % PAGE + 1 for _, _, kv in rows]
    attn.plan(batch)
    for layer in range(layers):
        q = torch.cat([seqs.q[layer][s][kv - ql : kv] for s, ql, kv in rows])
        k = torch.cat([seqs.k[layer][s][kv - ql : kv] for s, ql, kv in rows])
        v = torch.cat([seqs.v[layer][s][kv - ql : kv] for s, ql, kv in rows])
        out = attn.forward(layer, q, k, v)
        assert out.shape == q.shape and out.dtype == q.dtype
        start = 0
        for s, ql, kv in rows:
            want = reference(seqs, layer, s, ql, kv, heads, kv_heads)
            where = f"layer {layer} seq {s} (q_len {ql}, kv_len {kv})"
            torch.testing.assert_close(out[start : start + ql].double(), want, atol=2e-5, rtol=1e-5,
                                       msg=lambda m, where=where: f"{where}: {m}")
            start += ql


def check_cache(cache: KVCache, seqs: Seqs, written: dict[int, int], layers: int):
    """written: seq -> number of positions written so far."""
    for layer in range(layers):
        kv = cache.layers[layer]
        for s, n in written.items():
            for p in range(n):
                page, off = seqs.pages[s][p // PAGE], p % PAGE
                assert torch.equal(kv[page, 0, off], seqs.k[layer][s][p]), f"K of seq {s} pos {p} layer {layer}"
                assert torch.equal(kv[page, 1, off], seqs.v[layer][s][p]), f"V of seq {s} pos {p} layer {layer}"
            # offsets past the end of the last page are untouched
            for p in range(n, cdiv(n, PAGE) * PAGE):
                page, off = seqs.pages[s][p // PAGE], p % PAGE
                assert not kv[page, :, off].any()
        untouched = [p for p in range(cache.num_pages) if p not in seqs.used]
        assert not kv[untouched].any(), "K/V written into a page no sequence owns"


@pytest.mark.parametrize("heads,kv_heads", [(6, 2), (4, 4), (8, 1)])
@pytest.mark.parametrize("seed", [0, 1])
def test_paged_attention_matches_dense_reference(heads, kv_heads, seed):
    dim, layers, num_pages = 8, 2, 48
    # final lengths of the sequences; the first step writes a prefix, the second a mix of rows
    lengths = [13, 7, 9, 1, 4, 5, 17, 12]
    seqs = Seqs(lengths, num_pages, kv_heads, heads, dim, layers, seed)
    cache = KVCache(layers, num_pages, PAGE, kv_heads, dim, torch.float32, torch.device("cpu"))
    attn = make_backend("torch", cache, heads, dim)
    assert isinstance(attn, TorchAttention)

    # step 1: prefill prefixes (chunks that start at 0 and at a page boundary / mid-page)
    step1 = [(0, 5, 5), (2, 8, 8), (4, 3, 3), (5, 4, 4), (6, 16, 16), (7, 6, 6)]
    run_step(attn, seqs, step1, len(step1), layers, heads, kv_heads)
    check_cache(cache, seqs, {s: kv for s, _, kv in step1}, layers)
    # step 2: mid-sequence prefill chunks crossing pages, a whole prefill, then decode rows
    step2 = [(0, 8, 13), (1, 7, 7), (2, 1, 9), (7, 6, 12),  # prefill rows
             (3, 1, 1), (4, 1, 4), (5, 1, 5), (6, 1, 17)]  # decode rows: first page, full page, new page, long
    run_step(attn, seqs, step2, 4, layers, heads, kv_heads)
    check_cache(cache, seqs, {s: n for s, n in enumerate(lengths)}, layers)


def test_decode_only_batch_with_different_lengths():
    heads, kv_heads, dim, layers, num_pages = 4, 2, 16, 1, 40
    lengths = [1, 2, 30, 8, 9, 33]
    seqs = Seqs(lengths, num_pages, kv_heads, heads, dim, layers, seed=5)
    cache = KVCache(layers, num_pages, PAGE, kv_heads, dim, torch.float32, torch.device("cpu"))
    attn = TorchAttention(cache, heads, dim)
    prefill = [(s, n - 1, n - 1) for s, n in enumerate(lengths) if n > 1]
    run_step(attn, seqs, prefill, len(prefill), layers, heads, kv_heads)
    decode = [(s, 1, n) for s, n in enumerate(lengths)]
    run_step(attn, seqs, decode, 0, layers, heads, kv_heads)
    check_cache(cache, seqs, dict(enumerate(lengths)), layers)


def test_prefill_of_a_whole_sequence_one_token_at_a_time_matches_one_shot():
    """Chunking must not change the result: 11 decode-like steps give what one prefill gives."""
    heads, kv_heads, dim, n = 4, 2, 8, 11
    seqs = Seqs([n], 8, kv_heads, heads, dim, 1, seed=3)
    outs = []
    for chunks in ([n], [1] * n, [3, 5, 3]):
        cache = KVCache(1, 8, PAGE, kv_heads, dim, torch.float32, torch.device("cpu"))
        attn = TorchAttention(cache, heads, dim)
        pieces, done = [], 0
        for c in chunks:
            rows = [(0, c, done + c)]
            attn.plan(plan_for(rows, seqs, num_prefill=1))
            pieces.append(attn.forward(0, seqs.q[0][0][done : done + c], seqs.k[0][0][done : done + c],
                                       seqs.v[0][0][done : done + c]))
            done += c
        outs.append(torch.cat(pieces))
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs[2], outs[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs[0].double(), reference(seqs, 0, 0, n, n, heads, kv_heads), atol=2e-5, rtol=1e-5)


def test_bfloat16_cache_attention_computed_in_float32():
    heads, kv_heads, dim = 4, 2, 8
    lengths = [6, 3]
    seqs = Seqs(lengths, 8, kv_heads, heads, dim, 1, seed=9)
    cache = KVCache(1, 8, PAGE, kv_heads, dim, torch.bfloat16, torch.device("cpu"))
    attn = TorchAttention(cache, heads, dim)
    rows = [(0, 6, 6), (1, 3, 3)]
    attn.plan(plan_for(rows, seqs, 2))
    q = torch.cat([seqs.q[0][s][:n] for s, n in enumerate(lengths)])
    k = torch.cat([seqs.k[0][s][:n] for s, n in enumerate(lengths)])
    v = torch.cat([seqs.v[0][s][:n] for s, n in enumerate(lengths)])
    out = attn.forward(0, q, k, v)
    assert out.dtype == torch.float32
    assert cache.layers[0].dtype == torch.bfloat16
    # reference from the bf16-rounded K/V
    for layer_list in (seqs.k[0], seqs.v[0]):
        for i in range(len(layer_list)):
            layer_list[i] = layer_list[i].bfloat16().float()
    start = 0
    for s, ql, kv in rows:
        torch.testing.assert_close(out[start : start + ql].double(), reference(seqs, 0, s, ql, kv, heads, kv_heads),
                                   atol=1e-4, rtol=1e-4)
        start += ql


def test_the_torch_backend_refuses_cuda_graphs_clearly():
    backend = TorchAttention(KVCache(1, 4, 16, 2, 16, torch.float32, torch.device("cpu")), 4, 16)
    with pytest.raises(RuntimeError, match="does not run CUDA graphs: launch with --no-cuda-graphs"):
        backend.add_graph_size(8, 64)
    with pytest.raises(TypeError, match="abstract"):
        type("Partial", (AttentionBackend,), {"plan": lambda self, batch, graph_size=None: None})()


@pytest.mark.parametrize("k_scale,v_scale", [(1.0, 1.0), (0.25, 4.0)])
def test_fp8_cache_stores_scaled_e4m3_and_attends_to_what_it_stores(k_scale, v_scale):
    """An FP8 cache holds round(K / k_scale) in e4m3, saturated at +-448; attention reads it back times
    the scale. The result equals the float64 reference over the e4m3-rounded K/V, and differs from
    the unrounded one by about e4m3's relative step (2^-4 at worst, ~2^-5 on average per element)."""
    heads, kv_heads, dim = 4, 2, 16
    lengths = [9, 5]
    seqs = Seqs(lengths, 8, kv_heads, heads, dim, 1, seed=11)
    seqs.k[0][0][0, 0, :2] = torch.tensor([1e4, -1e4])  # beyond e4m3's range at any scale here: saturates
    cache = KVCache(1, 8, PAGE, kv_heads, dim, torch.float8_e4m3fn, torch.device("cpu"), scales=[(k_scale, v_scale)])
    attn = TorchAttention(cache, heads, dim)
    rows = [(0, 9, 9), (1, 5, 5)]
    attn.plan(plan_for(rows, seqs, 2))
    q, k, v = (torch.cat([x[0][s][:n] for s, n in enumerate(lengths)]) for x in (seqs.q, seqs.k, seqs.v))
    out = attn.forward(0, q, k, v)
    assert cache.layers[0].dtype == torch.float8_e4m3fn and not cache.layers[0].float().isnan().any()
    page0 = seqs.pages[0][0]
    stored = cache.layers[0][page0, 0, 0, 0, :2].float() * k_scale
    assert stored.tolist() == [448.0 * k_scale, -448.0 * k_scale]
    exact = reference(seqs, 0, 1, 5, 5, heads, kv_heads)  # sequence 1 has no saturated value
    for lst, scale in ((seqs.k[0], k_scale), (seqs.v[0], v_scale)):
        for j in range(len(lst)):
            lst[j] = (lst[j] / scale).clamp(-448, 448).to(torch.float8_e4m3fn).double() * scale
    start = 0
    for s, ql, kv in rows:
        torch.testing.assert_close(out[start : start + ql].double(), reference(seqs, 0, s, ql, kv, heads, kv_heads),
                                   atol=1e-5, rtol=1e-5)
        start += ql
    err = (out[9:].double() - exact).abs()
    assert 0 < err.max() < 0.1 and err.mean() < 0.02


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float8_e4m3fn])
def test_copied_pages_hold_the_sources_bytes_in_every_layer(dtype):
    cache = KVCache(3, 8, 4, 2, 16, dtype, torch.device("cpu"))
    cache.data.copy_(torch.randn(cache.data.shape).to(dtype))
    before = cache.data.clone()
    cache.copy_pages(torch.tensor([1, 6]), torch.tensor([5, 2]))
    as_bytes = cache.data.view(torch.uint8)
    assert torch.equal(as_bytes[:, 5], before.view(torch.uint8)[:, 1])
    assert torch.equal(as_bytes[:, 2], before.view(torch.uint8)[:, 6])
    untouched = [0, 1, 3, 4, 6, 7]
    assert torch.equal(as_bytes[:, untouched], before.view(torch.uint8)[:, untouched])
