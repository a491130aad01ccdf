"""Hydragen: the scheduler's grouping of decode rows by shared prefix pages, and attention with
groups (shared pages once per group, merged with each row's own pages) equal to plain attention."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from toka.arith import cdiv
from toka.scheduler.hydragen import group_by_prefix
from workers.attention import make_backend
from workers.kv_cache import KVCache
from workers.runner import ModelRunner

PAGE = 4


def seq(pages, keyed):
    return SimpleNamespace(pages=pages, keyed=keyed)


def test_group_by_prefix_orders_groups_first_and_finds_the_shared_length():
    a = [seq([1, 2, 3, 10 + i], 3) for i in range(3)]  # three rows sharing pages 1, 2, 3
    b = [seq([5, 6, 20 + i], 2) for i in range(2)]  # two rows sharing 5, 6: below the group size
    lone = seq([7, 8, 9], 0)
    early = seq([1, 2, 30, 31], 2)  # shares only pages 1, 2 with group a
    rows, counts, prefixes = group_by_prefix([lone, a[0], b[0], a[1], b[1], a[2]], min_group=3, min_pages=2)
    assert counts == [3] and prefixes == [3] and rows[:3] == a and set(map(id, rows)) == set(map(id, [lone, *a, *b]))
    rows, counts, prefixes = group_by_prefix(a + [early], min_group=3, min_pages=1)
    assert counts == [4] and prefixes[0] <= 2 and a[0].pages[: prefixes[0]] == early.pages[: prefixes[0]]
    assert group_by_prefix(a, min_group=3, min_pages=4)[1] == []  # prefix too short


def grouped_attention_case(device, dtype, backend: str, seed: int = 0, decode_kernel: str = "cuda-cores",
                           kv_dtype=None, graph: bool = False):
    """Decode rows in two groups (4 rows x 5 shared pages, 3 rows x 2) and 2 rows alone, each with
    1..3 own pages: `backend`'s output with the groups and the torch backend's without them, over a
    cache of `kv_dtype` (default `dtype`). With `graph`, the grouped output is a CUDA graph's replay,
    captured with other groups (three of two rows and one page) in buffers for up to four."""
    kv_dtype = kv_dtype or dtype
    rng = random.Random(seed)
    torch.manual_seed(seed)
    heads, kv_heads, dim, num_pages = 8, 2, 64, 96
    free = list(range(num_pages))
    rng.shuffle(free)
    row_pages, kv_lens = [], []
    for rows, shared in ((4, 5), (3, 2), (2, 0)):
        prefix = [free.pop() for _ in range(shared)]
        for _ in range(rows):
            own = rng.randint(1, 3 * PAGE)
            row_pages.append(prefix + [free.pop() for _ in range(cdiv(own, PAGE))])
            kv_lens.append(shared * PAGE + own)
    n = len(row_pages)
    q = torch.randn(n, heads, dim, device=device).to(dtype)
    k = torch.randn(n, kv_heads, dim, device=device).to(dtype)
    v = torch.randn(n, kv_heads, dim, device=device).to(dtype)
    history = torch.randn(1, num_pages, 2, PAGE, kv_heads, dim, device=device).to(kv_dtype)
    outs = {}
    for name, groups in (("plain", ((), ())), ("grouped", ([4, 3], [5, 2]))):
        cache = KVCache(1, num_pages, PAGE, kv_heads, dim, kv_dtype, torch.device(device))
        cache.data.copy_(history)
        attn = make_backend("torch" if name == "plain" else backend, cache, heads, dim, decode_kernel, dtype)
        runner = ModelRunner(None, attn, n, PAGE, torch.device(device), scratch_page=num_pages - 1, max_pages_per_seq=8)
        for r, pages in enumerate(row_pages):
            runner.page_table[r, : len(pages)] = torch.tensor(pages, dtype=torch.int32)
        batch, _ = runner._attention_batch(list(range(n)), [1] * n, kv_lens, 0, *groups)
        if name == "grouped":
            g = batch.groups
            assert g.suffix_indptr_host[-1] == sum(len(p) for p in row_pages) - 4 * 5 - 3 * 2
        if name == "grouped" and graph:
            attn.add_graph_size(n, max_pages=num_pages + n, groups=4)
            other, _ = runner._attention_batch(list(range(n)), [1] * n, kv_lens, 0, [2, 2, 2], [1, 1, 1])
            attn.plan(other, graph_size=n)
            attn.forward(0, q, k, v)  # warm-up; it appends the same k, v at the same places
            captured = torch.cuda.CUDAGraph()
            with torch.cuda.graph(captured):
                out = attn.forward(0, q, k, v)
            attn.plan(batch, graph_size=n)
            captured.replay()
            outs[name] = out.float()
            continue
        attn.plan(batch)
        outs[name] = attn.forward(0, q, k, v).float()
    return outs["plain"], outs["grouped"]


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float8_e4m3fn], ids=["float32", "fp8"])
def test_grouped_attention_equals_plain_attention(kv_dtype):
    plain, grouped = grouped_attention_case("cpu", torch.float32, "torch", kv_dtype=kv_dtype)
    torch.testing.assert_close(grouped, plain, atol=1e-5, rtol=1e-5)


def test_decode_steps_replay_the_smallest_graph_that_holds_their_rows_and_groups():
    from toka.protocol import StepPlan

    runner = ModelRunner(None, None, 64, PAGE, torch.device("cpu"), scratch_page=0, max_pages_per_seq=4)
    runner.graphs = {s: None for s in (8, 16, 32)}
    runner.grouped_graphs = {s: None for s in (16, 32)}  # groups of 4 rows or more: 4 and 8 groups
    runner.min_group = 4

    def plan(rows: int, groups: list[int] = (), prefill: int = 0) -> StepPlan:
        return StepPlan(1, list(range(rows)), list(range(rows)), [1] * rows, [5] * rows, [True] * rows, prefill,
                        [], [], [], [], group_rows=list(groups), group_pages=[1] * len(groups))

    def size(p: StepPlan):
        chosen = runner._graph_for(p)
        return None if chosen is None else (chosen[0], chosen[1] is runner.grouped_graphs)

    assert size(plan(5)) == (8, False)
    assert size(plan(9)) == (16, False)
    assert size(plan(33)) is None  # beyond the largest capture: eager
    assert size(plan(9, prefill=1)) is None  # mixed steps run eagerly
    assert size(plan(9, [4, 5])) == (16, True)
    assert size(plan(12, [4, 4, 4])) == (16, True)
    assert size(plan(16, [4] * 4)) == (16, True)
    assert size(plan(20, [4] * 5)) == (32, True)  # 16 rows would hold only 4 groups
    assert size(plan(33, [4] * 5)) is None
