"""FlashInfer backend and CUDA graphs against the torch reference (CUDA only)."""

from __future__ import annotations

import random

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

from tests.helpers import batch_with_pages  # noqa: E402
from toka.arith import cdiv  # noqa: E402
from workers.attention import make_backend  # noqa: E402
from workers.kv_cache import KVCache  # noqa: E402
from workers.runner import ModelRunner  # noqa: E402

PAGE = 16
DECODE_KERNELS = ["triton", "cuda-cores", "tensor-cores", "xqa"]
both_decode_kernels = pytest.mark.parametrize("decode_kernel", DECODE_KERNELS)


def make_batch(runner, rows, page_size):
    """rows: (q_len, kv_len) with prefill rows first; random distinct pages per row."""
    rng = random.Random(0)
    pool = list(range(runner.scratch_page))
    rng.shuffle(pool)
    row_pages = [[pool.pop() for _ in range(cdiv(kv, page_size))] for _, kv in rows]
    num_prefill = sum(1 for q, _ in rows if q > 1)
    return batch_with_pages(runner, [q for q, _ in rows], [kv for _, kv in rows], row_pages, num_prefill)


FP8 = torch.float8_e4m3fn
kv_types = pytest.mark.parametrize("kv_dtype", [torch.bfloat16, FP8], ids=["bf16-kv", "fp8-kv"])


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(32, 8, 64), (16, 8, 128)])
@pytest.mark.parametrize("kind", ["prefill", "decode", "mixed"])
@both_decode_kernels
@kv_types
def test_flashinfer_equals_torch(heads, kv_heads, head_dim, kind, decode_kernel, kv_dtype):
    """Both backends read what the cache holds (an FP8 one scaled back), so FlashInfer matches the
    float32 reference to bf16 rounding whatever the cache's type; scales 0.5 / 2 on FP8 check that
    the kernels apply K's and V's."""
    torch.manual_seed(0)
    dev = torch.device("cuda")
    rows = {
        "prefill": [(37, 37), (16, 16), (5, 40), (33, 65)],  # some continue earlier chunks
        # 1,100 and 700 tokens: rows of several work items of the Triton kernel, merged
        "decode": [(1, 1), (1, 16), (1, 17), (1, 300), (1, 33), (1, 1100)],
        "mixed": [(20, 20), (7, 39), (1, 16), (1, 129), (1, 2), (1, 700)],
    }[kind]
    caches, outs = {}, {}
    scales = [(0.5, 2.0)] if kv_dtype == FP8 else None
    for name in ("torch", "flashinfer"):
        caches[name] = KVCache(1, 128, PAGE, kv_heads, head_dim, kv_dtype, dev, scales=scales)
    # history already in the cache (positions before each row's queries), identical in both
    for name in caches:
        torch.manual_seed(1)
        caches[name].data.copy_(torch.randn(caches[name].data.shape, device=dev).to(kv_dtype))
    for name, cache in caches.items():
        backend = make_backend(name, cache, heads, head_dim, decode_kernel=decode_kernel, dtype=torch.bfloat16)
        runner = ModelRunner(None, backend, 8, PAGE, dev, scratch_page=127, max_pages_per_seq=128)
        batch = make_batch(runner, rows, PAGE)
        torch.manual_seed(2)
        t = sum(q for q, _ in rows)
        q = torch.randn(t, heads, head_dim, dtype=torch.bfloat16, device=dev)
        k = torch.randn(t, kv_heads, head_dim, dtype=torch.bfloat16, device=dev)
        v = torch.randn(t, kv_heads, head_dim, dtype=torch.bfloat16, device=dev)
        backend.plan(batch)
        outs[name] = backend.forward(0, q, k, v).float()
    ref, got = outs["torch"], outs["flashinfer"]
    assert torch.isfinite(got).all()
    rel = ((got - ref).norm() / ref.norm()).item()
    # XQA's Hopper kernel for FP8 pages multiplies in e4m3: it rounds the queries and the softmax
    # probabilities to FP8 too (measured on an H200: 1.0-1.7 % here, the others under 1 %)
    assert rel <= (0.025 if decode_kernel == "xqa" and kv_dtype == FP8 else 1e-2), rel
    assert torch.equal(caches["torch"].data.view(torch.uint8), caches["flashinfer"].data.view(torch.uint8)), \
        "appended K/V differ"


@pytest.mark.parametrize("kind", ["prefill", "decode"])
def test_fp8_cache_against_a_bf16_one(kind):
    """The same K/V history and new tokens in a bf16 cache and in an FP8 one (scale 1.0): FlashInfer's
    outputs differ by the e4m3 rounding of K and V. Each element is off by up to 2^-4 of itself (3
    mantissa bits, round to nearest), ~2.5 % on average; attention averages V's errors over the keys
    and K's enter the scores scaled by 1/sqrt(d), so the output's relative error stays near e4m3's
    average step: measured ~2-3 %, bounded here at 5 %."""
    torch.manual_seed(0)
    dev = torch.device("cuda")
    heads, kv_heads, head_dim = 32, 8, 64
    rows = {"prefill": [(37, 37), (5, 40), (33, 65)], "decode": [(1, 16), (1, 300), (1, 33), (1, 900)]}[kind]
    history = torch.randn(1, 128, 2, PAGE, kv_heads, head_dim, device=dev)
    t = sum(q for q, _ in rows)
    q, k, v = (torch.randn(t, h, head_dim, device=dev, dtype=torch.bfloat16) for h in (heads, kv_heads, kv_heads))
    outs = {}
    for kv_dtype in (torch.bfloat16, FP8):
        cache = KVCache(1, 128, PAGE, kv_heads, head_dim, kv_dtype, dev)
        cache.data.copy_(history.to(kv_dtype))
        backend = make_backend("flashinfer", cache, heads, head_dim, dtype=torch.bfloat16)
        runner = ModelRunner(None, backend, 8, PAGE, dev, scratch_page=127, max_pages_per_seq=128)
        backend.plan(make_batch(runner, rows, PAGE))
        outs[kv_dtype] = backend.forward(0, q, k, v).float()
    ref, got = outs[torch.bfloat16], outs[FP8]
    rel = ((got - ref).norm() / ref.norm()).item()
    print(f"fp8 against bf16 cache, {kind}: relative error {rel:.4f}")
    assert 0 < rel <= 0.05, rel


def after_prefill(plan) -> tuple[list[int], list[int], int]:
    """The rows' kv lengths and page counts after a prefill plan, and the first page it left unused:
    next_decode_step's arguments."""
    kv_lens = list(plan.kv_lens)
    return kv_lens, [cdiv(n, PAGE) for n in kv_lens], max(plan.table_pages) + 1


def next_decode_step(kv_lens: list[int], num_pages: list[int], nxt: int) -> tuple[list[int], tuple, int]:
    """Row r (slot r) decodes a token: its new kv length, the table writes of the rows that need a
    page (the next unused page, nxt), and the next unused page after them. Updates num_pages."""
    kv_lens = [n + 1 for n in kv_lens]
    writes = ([], [], [])
    for r, n in enumerate(kv_lens):
        if num_pages[r] * PAGE < n:
            for part, value in zip(writes, (r, num_pages[r], nxt)):
                part.append(value)
            num_pages[r] += 1
            nxt += 1
    return kv_lens, writes, nxt


@pytest.mark.parametrize("decode_attention", DECODE_KERNELS)
def test_cuda_graph_and_eager_give_the_same_tokens(tmp_path, decode_attention):
    from tests.helpers import local_runner, prefill_plan
    from toka.protocol import StepPlan
    from tools.make_model import make_model

    path = make_model("small-llama", tmp_path / "m", dtype="bfloat16")
    outputs = []
    for graphs in (False, True):
        runner = local_runner(str(path), dtype="bfloat16", device="cuda", kv_tokens=4096, max_seqs=16,
                              cuda_graphs=graphs, decode_attention=decode_attention)
        assert bool(runner.graphs) == graphs
        prompts = [[(7 * r + i) % 500 for i in range(5 + 3 * r)] for r in range(5)]
        plan = prefill_plan(0, prompts, PAGE)
        tokens = [runner.step(plan).tokens]
        kv_lens, num_pages, nxt = after_prefill(plan)
        for step in range(1, 20):
            kv_lens, writes, nxt = next_decode_step(kv_lens, num_pages, nxt)
            plan = StepPlan(step, list(range(5)), list(range(5)), [1] * 5, kv_lens, [True] * 5, 0, [], *writes)
            tokens.append(runner.step(plan).tokens)
        outputs.append(tokens)
    assert outputs[0] == outputs[1]


def test_prefill_and_mixed_steps_in_pieces_give_the_eager_tokens(tmp_path):
    """Three prompts prefilled, three decode steps, a fourth prompt prefilled beside the three
    decoding rows (a mixed step), four decode steps: with CUDA graphs (the prefill and mixed steps
    replay pieces of 256 tokens, cut at each attention) and without, the same tokens, and logprobs
    to rounding (cuBLAS may pick other kernels for the padded row count)."""
    from tests.helpers import local_runner, prefill_plan
    from toka.protocol import SeqParams, StepPlan
    from tools.make_model import make_model

    path = make_model("small-llama", tmp_path / "m", dtype="bfloat16")
    outputs = []
    for graphs in (False, True):
        runner = local_runner(str(path), dtype="bfloat16", device="cuda", kv_tokens=4096, max_seqs=16,
                              cuda_graphs=graphs, piecewise_graphs=graphs)
        assert bool(runner.pieces) == graphs
        plan = prefill_plan(0, [[(7 * r + i) % 500 for i in range(5 + 40 * r)] for r in range(3)], PAGE)
        results = [runner.step(plan)]
        kv_lens, num_pages, nxt = after_prefill(plan)
        for step in range(1, 9):
            if step == 4:  # slot 3 prefills 150 tokens (the first row) while slots 0-2 decode
                kv_lens, (slots, cols, pages), nxt = next_decode_step(kv_lens, num_pages, nxt)
                own = cdiv(150, PAGE)
                writes = ([3] * own + slots, list(range(own)) + cols, list(range(nxt, nxt + own)) + pages)
                nxt += own
                plan = StepPlan(step, [3, 0, 1, 2], [3, 0, 1, 2], [150, 1, 1, 1], [150, *kv_lens], [True] * 4, 1,
                                [(3 * i + 1) % 500 for i in range(150)], *writes, [SeqParams(slot=3)])
                kv_lens.append(150)
                num_pages.append(own)
            else:
                kv_lens, writes, nxt = next_decode_step(kv_lens, num_pages, nxt)
                rows = list(range(len(kv_lens)))
                plan = StepPlan(step, rows, rows, [1] * len(rows), kv_lens, [True] * len(rows), 0, [], *writes)
            results.append(runner.step(plan))
        outputs.append(results)
    eager, pieces = outputs
    assert [r.tokens for r in eager] == [r.tokens for r in pieces]
    diff = max(abs(a - b) for x, y in zip(eager, pieces) for a, b in zip(x.logprobs, y.logprobs))
    assert diff <= 0.02, diff


@pytest.mark.parametrize("decode_attention", ["triton", "cuda-cores"])
def test_hydragen_steps_in_cuda_graphs_give_the_eager_tokens(tmp_path, decode_attention):
    """Two groups of five rows, each group's rows sharing a prompt of two pages and having their own
    suffix, and two rows alone: twenty greedy decode steps with the groups, eager and replayed."""
    from tests.helpers import local_runner
    from toka.protocol import SeqParams, StepPlan
    from tools.make_model import make_model

    path = make_model("small-llama", tmp_path / "m", dtype="bfloat16")
    shared = [[(11 * g + i) % 500 for i in range(2 * PAGE)] for g in range(2)]
    own = [[(5 * r + i) % 500 for i in range(3 + 2 * r)] for r in range(12)]
    outputs = []
    for graphs in (False, True):
        runner = local_runner(str(path), dtype="bfloat16", device="cuda", kv_tokens=4096, max_seqs=16,
                              cuda_graphs=graphs, hydragen_min_group=4, decode_attention=decode_attention)
        assert bool(runner.grouped_graphs) == graphs
        group_pages = [[0, 1], [2, 3]]  # the first row of each group computes its group's shared pages
        step0 = StepPlan(0, [0, 5], [0, 5], [2 * PAGE] * 2, [2 * PAGE] * 2, [False] * 2, 2, shared[0] + shared[1],
                         [0, 0, 5, 5], [0, 1, 0, 1], [0, 1, 2, 3], [SeqParams(slot=s) for s in (0, 5)])
        runner.step(step0)
        nxt, writes, kv_lens, q_lens, tokens, num_pages = 4, ([], [], []), [], [], [], []
        for r in range(12):
            prefix = [] if r >= 10 else group_pages[r // 5]
            tokens += own[r]
            kv = len(prefix) * PAGE + len(own[r])
            pages = prefix + list(range(nxt, nxt + cdiv(kv, PAGE) - len(prefix)))
            nxt += len(pages) - len(prefix)
            start = 2 if r in (0, 5) else 0  # the groups' first rows have their shared pages already
            for c in range(start, len(pages)):
                for part, value in zip(writes, (r, c, pages[c])):
                    part.append(value)
            num_pages.append(len(pages))
            kv_lens.append(kv)
            q_lens.append(len(own[r]))
        admit = [SeqParams(slot=r) for r in range(12) if r not in (0, 5)]
        step1 = StepPlan(1, list(range(12)), list(range(12)), q_lens, kv_lens, [True] * 12, 12, tokens, *writes, admit)
        steps = [runner.step(step1).tokens]
        for step in range(2, 22):
            kv_lens, writes, nxt = next_decode_step(kv_lens, num_pages, nxt)
            plan = StepPlan(step, list(range(12)), list(range(12)), [1] * 12, kv_lens, [True] * 12, 0, [], *writes,
                            group_rows=[5, 5], group_pages=[2, 2])
            assert (runner._graph_for(plan) is not None) == graphs
            steps.append(runner.step(plan).tokens)
        outputs.append(steps)
    assert outputs[0] == outputs[1]


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "cuda-graph"])
@both_decode_kernels
@kv_types
def test_flashinfer_hydragen_groups_equal_torch_without_them(decode_kernel, kv_dtype, graph):
    from tests.unit.test_hydragen import grouped_attention_case

    plain, grouped = grouped_attention_case("cuda", torch.bfloat16, "flashinfer", decode_kernel=decode_kernel,
                                            kv_dtype=kv_dtype, graph=graph)
    assert torch.isfinite(grouped).all()
    rel = ((grouped - plain).norm() / plain.norm()).item()
    assert rel <= 1e-2, rel


@kv_types
def test_a_captured_hydragen_plan_of_2048_rows_at_8b_heads_fits_its_workspace(kv_dtype):
    """The capture's plan of 2,048 rows in 128 groups at Llama-3.1-8B's heads (32 of 128 dimensions
    over 8 kv heads): FlashInfer's FA2 path over an FP8 cache sizes its split outputs for every
    query tile the rows can make, more than the shared prefill workspace holds; the graphs' prefix
    plans get a workspace of their own, sized for the largest."""
    from workers.attention.flashinfer_backend import graph_prefix_workspace_bytes

    heads, kv_heads, dim, bs, min_group, num_pages = 32, 8, 128, 2048, 16, 8
    device = torch.device("cuda")
    cache = KVCache(1, num_pages, PAGE, kv_heads, dim, kv_dtype, device)
    attn = make_backend("flashinfer", cache, heads, dim, "triton", torch.bfloat16)
    runner = ModelRunner(None, attn, bs, PAGE, device, scratch_page=num_pages - 1, max_pages_per_seq=4)
    runner.page_table[runner.scratch_slot, 1] = runner.scratch_page
    attn.add_graph_size(bs, max_pages=num_pages + bs, groups=bs // min_group)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    assert attn.prefix_ws.numel() >= graph_prefix_workspace_bytes(bs, bs // min_group + 1, heads, kv_heads, dim, sms)
    batch, _ = runner._attention_batch([runner.scratch_slot] * bs, [1] * bs, [PAGE + 1] * bs, 0,
                                       [min_group] * (bs // min_group), [1] * (bs // min_group))
    attn.plan(batch, graph_size=bs)  # raised "Buffer overflow ... batch_prefill_tmp_v" over FP8 in 256 MiB
    q = torch.randn(bs, heads, dim, device=device, dtype=torch.bfloat16)
    k = torch.randn(bs, kv_heads, dim, device=device, dtype=torch.bfloat16)
    assert torch.isfinite(attn.forward(0, q, k, k.clone())).all()
