"""The scheduler's prefix cache and pipeline stages, against simulated ranks that check every row's
context (tests/unit/scheduler_harness.py): shared and repeated prompts, copies of whole cached
pages, eviction under preemption, n choices of one prompt, interleaved micro-batches."""

from __future__ import annotations

import random
from collections import deque

import pytest

from tests.unit.scheduler_harness import VOCAB, Harness, params
from toka.protocol import StepResult
from toka.scheduler.batching import Scheduler


# ---- prefix cache ------------------------------------------------------------------------------------
def _shared_prefix_requests(rng: random.Random, n: int, max_len: int, page_size: int):
    """Prompts made of a few common prefixes, with repeats (n > 1 style) and random tails."""
    prefixes = [[rng.randrange(VOCAB) for _ in range(rng.randint(1, max_len // 2))] for _ in range(3)]
    reqs = []
    for rid in range(n):
        prompt = list(rng.choice(prefixes))[: max_len // 2]
        if rng.random() < 0.5:
            prompt += [rng.randrange(VOCAB) for _ in range(rng.randint(0, page_size * 2))]
        prompt = prompt[: max_len // 2] or [1]
        mt = rng.randint(0, max_len - len(prompt))
        kw = dict(temperature=0.7, seed=rid, prompt_logprobs=rng.choice([-1, -1, -1, 0]))
        reqs.append((rid * 5 + 2, prompt, params(mt, stop=(), **kw)))
    return reqs


@pytest.mark.parametrize("seed", range(10))
def test_stress_shared_prefixes_tight_memory(seed):
    """Cached pages shared by many rows, evicted and recomputed under preemption: every row still
    reads exactly its own tokens (the fake ranks check each context), no page is written by two rows
    or rewritten while a step in flight reads it, and the cache was hit."""
    rng = random.Random(seed)
    page_size = rng.choice([1, 2, 4])
    num_pages = rng.randint(6, 14)
    h = Harness(num_pages=num_pages, page_size=page_size, max_seqs=rng.randint(2, 8),
                max_tokens_per_forward=rng.randint(4, 16), steps_ahead=rng.randint(1, 3), seed=seed)
    h.run(_shared_prefix_requests(rng, 40, num_pages * page_size, page_size), abort_prob=0.01)
    assert len(h.ended) == 40
    hits = sum(1 for p in h.plans for r in range(p.num_prefill)
               if p.slots[r] in {a.slot for a in p.admit} and p.kv_lens[r] > p.q_lens[r])
    assert hits > 0, "no admission found its prefix cached"


def test_repeated_prompt_prefills_only_its_last_partial_page():
    h = Harness(num_pages=64, page_size=4, max_seqs=8, max_tokens_per_forward=64)
    prompt = list(range(10, 24))  # 14 tokens: 3 full pages and 2 more
    for rid in (1, 2, 3):  # like n = 3: admitted together, the first computes the shared pages
        h.add(rid, prompt, params(3, stop=()))
    plan = h.schedule()
    assert plan.q_lens[:3] == [14, 2, 2] and plan.kv_lens[:3] == [14, 14, 14]
    assert plan.cached_rids == [2, 3] and plan.cached_tokens == [12, 12]
    assert h.sched.prefix_hit_tokens == 24
    h.run()
    h.add(4, prompt[:13], params(2, stop=()))  # 13 tokens: 3 cached pages, the 13th computed
    plan = h.schedule()
    assert plan.q_lens == [1] and plan.cached_tokens == [12]
    assert h.sched.prefix_hit_tokens == 36
    h.run()
    assert h.sched.pages.num_free == 64 and h.sched.pages.num_cached > 0


def test_a_prompt_of_whole_cached_pages_copies_its_last_page_and_recomputes_one_token():
    h = Harness(num_pages=64, page_size=4, max_seqs=8, max_tokens_per_forward=64)
    prompt = list(range(10, 22))  # 12 tokens: 3 full pages
    for rid in (1, 2, 3):  # like n = 3: the first computes the pages, the others copy the last one
        h.add(rid, prompt, params(3, stop=()))
    h.add(9, list(range(30, 40)), params(2, stop=()))
    # a step copies before it appends: the copies wait for the step that writes the pages, and the
    # requests behind them do not
    plan = h.schedule()
    assert plan.rids == [1, 9] and plan.q_lens == [12, 10] and [s.rid for s in h.sched.waiting] == [2, 3]
    plan = h.schedule()
    assert plan.rids == [2, 3, 1, 9] and plan.q_lens == [1, 1, 1, 1] and plan.kv_lens == [12, 12, 13, 11]
    first = h.sched.seqs[1].pages
    assert plan.copy_src == [first[2], first[2]]
    copies = [h.sched.seqs[rid].pages for rid in (2, 3)]
    assert [p[:2] for p in copies] == [first[:2]] * 2  # the leading pages are shared
    assert plan.copy_dst == [p[2] for p in copies] and len({first[2], *plan.copy_dst}) == 3
    assert plan.cached_tokens == [11, 11] and [h.sched.seqs[rid].keyed for rid in (1, 2, 3)] == [3, 2, 2]
    h.sched.check()
    h.run()  # the fake ranks check every row's context, the copies' included
    assert h.sched.pages.num_free == 64
    h.add(4, prompt, params(2, stop=()))  # all three pages cached, none held: the copy again
    plan = h.schedule()
    assert plan.q_lens == [1] and len(plan.copy_src) == 1 and plan.cached_tokens == [11]
    h.run()


def test_no_copy_without_a_free_page_for_it():
    h = Harness(num_pages=3, page_size=4, max_seqs=8, max_tokens_per_forward=64)
    h.add(1, list(range(12)), params(1, stop=()))
    h.run()  # its 3 pages are cached now, and none is free
    h.add(2, list(range(12)), params(1, stop=()))
    plan = h.schedule()
    assert plan.q_lens == [4] and plan.copy_src == []  # the last page recomputed, as without copies
    h.run()


def test_a_head_waiting_for_pages_is_not_counted_as_hits_again():
    h = Harness(num_pages=4, page_size=4, max_seqs=8, max_tokens_per_forward=64, steps_ahead=1)
    h.add(1, list(range(8)), params(8, stop=()))  # 2 cached pages, then decodes into all 4
    for _ in range(6):
        h.schedule()
        h.complete()
    assert h.sched.pages.num_free == 0
    h.add(2, list(range(9)), params(2, stop=()))  # matches the 2 pages, but its 9th token has no page
    for _ in range(2):
        assert h.schedule().rids == [1]
        h.complete()
    assert h.sched.prefix_hit_tokens == 0, "refused admissions are not hits"
    h.run()
    assert h.sched.prefix_hit_tokens == 8


def test_prompt_logprobs_requests_skip_the_cache():
    h = Harness(num_pages=64, page_size=4, max_seqs=8, max_tokens_per_forward=64)
    h.add(1, list(range(12)), params(2, stop=()))
    h.run()
    h.add(2, list(range(12)), params(2, stop=(), prompt_logprobs=0))
    assert h.schedule().q_lens == [12]


def test_cache_off_computes_every_prompt():
    h = Harness(num_pages=64, page_size=4, max_seqs=8, max_tokens_per_forward=64)
    h.sched.prefix_caching = False
    for rid in (1, 2):
        h.add(rid, list(range(12)), params(2, stop=()))
    assert h.schedule().q_lens == [12, 12]


def _drive(s: Scheduler, steps_ahead: int = 2) -> int:
    """Runs the scheduler to idle with every emitted token accepted; returns the tokens computed."""
    inflight, computed = deque(), 0
    while not s.idle:
        while s.inflight_steps < steps_ahead:
            plan = s.schedule()
            if plan is None:
                break
            inflight.append(plan)
            computed += sum(plan.q_lens)
        plan = inflight.popleft()
        rids = [r for r, e in zip(plan.rids, plan.emit) if e]
        s.update(StepResult(plan.step_id, rids, [5] * len(rids), [-0.1] * len(rids)))
    return computed


def test_preempted_sequences_do_not_thrash_when_the_cache_is_far_too_small():
    """16 sequences of 2,000 tokens, a 4,096-token cache: after a preemption admission keeps room
    for the running sequences' growth, so a preempted sequence does not come back only to be
    preempted again (before: 844 preemptions and 17 x the useful tokens computed)."""
    s = Scheduler(num_pages=256, page_size=16, max_seqs=16, max_tokens_per_forward=1024)
    for rid in range(16):
        s.add(rid, [7] * 1000, params(1000, stop=()))
    computed = _drive(s)
    assert s.preemptions <= 20
    assert computed < 1.5 * 16 * 2000
    assert s.finished["length"] == 16


def test_no_reserve_while_nothing_was_preempted():
    s = Scheduler(num_pages=64, page_size=4, max_seqs=8, max_tokens_per_forward=64)
    for rid in range(8):  # prompts of their own (the choices of one wait a step to copy its last page)
        s.add(rid, [3 + rid] * 8, params(100, stop=()))
    plan = s.schedule()
    assert len(plan.rids) == 8, "with room for every prompt, all are admitted at once"


def test_a_submits_n_choices_share_its_prompt_and_differ_in_seed():
    s = Scheduler(num_pages=64, page_size=4, max_seqs=8, max_tokens_per_forward=64)
    prompt = [3] * 10
    s.add(100, prompt, params(5, seed=7), n=4)
    seqs = [s.seqs[100 + i] for i in range(4)]
    assert all(q.prompt is prompt for q in seqs)  # one list in memory for all n
    assert [q.params.seed for q in seqs] == [7, 8, 9, 10]
    plan = s.schedule()
    assert plan.rids == [100, 101, 102, 103]


def test_a_prompts_page_keys_are_hashed_once_for_its_choices(monkeypatch):
    import toka.scheduler.batching as batching

    calls = []
    real = batching.page_keys
    monkeypatch.setattr(batching, "page_keys", lambda tokens, ps: calls.append(len(tokens)) or real(tokens, ps))
    s = Scheduler(num_pages=256, page_size=4, max_seqs=64, max_tokens_per_forward=4096)
    # 42 tokens: 10 full pages and 2 more, so the choices after the first are admitted with it
    s.add(0, [5] * 42, params(3, seed=1), n=32)
    s.add(32, [6] * 42, params(3, seed=1), n=32)
    plan = s.schedule()
    assert len(plan.rids) == 64 and calls == [42, 42]
    assert s.seqs[0].keys == real([5] * 42, 4) and s.seqs[40].keys == real([6] * 42, 4)


@pytest.mark.parametrize("seed", range(6))
def test_stress_pipeline_stages(seed):
    """Sequences decode in interleaved micro-batches, each reading only tokens its plan's input_step
    brought to the first stage, through preemptions, aborts and cached prefixes."""
    rng = random.Random(300 + seed)
    stages = rng.choice([2, 3, 4])
    page_size = rng.choice([1, 2, 4])
    num_pages = rng.randint(6, 14)
    h = Harness(num_pages=num_pages, page_size=page_size, max_seqs=rng.randint(2, 8),
                max_tokens_per_forward=rng.randint(4, 16), steps_ahead=stages + rng.randint(0, 2), seed=seed,
                stages=stages)
    h.run(_shared_prefix_requests(rng, 40, num_pages * page_size, page_size), abort_prob=0.01)
    assert len(h.ended) == 40
    assert any(p.input_step >= 0 for p in h.plans)
