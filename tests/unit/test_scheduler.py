"""The scheduler through its two calls, against simulated ranks that check every row's context
(tests/unit/scheduler_harness.py): single requests, aborts, step order, preemption, and random
stress under tight and roomy memory."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from tests.unit.scheduler_harness import STOP, VOCAB, Harness, expected_output, first_stop_distance, model_token, params
from toka.protocol import StepResult
from toka.scheduler.batching import Scheduler, StepOrderError


# ---- small scenarios -------------------------------------------------------------------------------
def test_single_request_runs_to_max_tokens():
    h = Harness(steps_ahead=1)
    h.run([(1, [3, 4, 5, 6, 8], params(6, stop=()))])
    assert h.ended[1] == ("length", [model_token(1, p) for p in range(5, 11)])
    # one prefill step, then one decode step per further token
    assert len(h.plans) == 6
    assert h.plans[0].num_prefill == 1 and h.plans[0].kv_lens == [5] and h.plans[0].emit == [True]
    assert [p.kv_lens for p in h.plans[1:]] == [[6], [7], [8], [9], [10]]


def test_stop_token_ends_without_being_output():
    rid, prompt = 2, [1, 2, 3]
    n = first_stop_distance(rid, len(prompt))
    h = Harness(steps_ahead=3)
    h.run([(rid, prompt, params(n + 10))])
    reason, toks = h.ended[rid]
    assert reason == "stop" and len(toks) == n and STOP not in toks


def test_max_tokens_one():
    h = Harness()
    h.run([(5, [1, 2], params(1, stop=()))])
    assert h.ended[5] == ("length", [model_token(5, 2)])
    assert len(h.plans) == 1


def test_prompt_only_request_ends_after_prefill_with_length():
    h = Harness(steps_ahead=3, max_tokens_per_forward=4)
    h.run([(9, list(range(10)), params(0, prompt_logprobs=0))])
    assert h.ended[9] == ("length", [])
    assert all(p.num_prefill == len(p.rids) == 1 for p in h.plans), "no decode row for max_tokens=0"
    assert [p.q_lens for p in h.plans] == [[4], [4], [2]]
    assert [p.emit for p in h.plans] == [[False], [False], [True]]
    assert [p.prefill_next for p in h.plans] == [[4], [8], [-1]]


def test_chunked_prefill_respects_the_budget_and_emits_once():
    h = Harness(max_tokens_per_forward=5, steps_ahead=2)
    prompt = [i % 50 for i in range(23)]
    h.run([(3, prompt, params(3, stop=()))])
    pre = [p for p in h.plans if p.num_prefill]
    assert [p.q_lens[0] for p in pre] == [5, 5, 5, 5, 3]
    assert [p.emit[0] for p in pre] == [False] * 4 + [True]
    assert h.ended[3][0] == "length" and len(h.ended[3][1]) == 3


def test_decode_continues_while_results_are_in_flight():
    h = Harness(steps_ahead=3)
    h.add(1, [1, 2, 3], params(10, stop=()))
    for _ in range(3):
        assert h.schedule() is not None
    assert h.sched.inflight_steps == 3
    assert [p.kv_lens for p in h.plans] == [[3], [4], [5]]
    # never more decode steps than max_tokens, however far ahead we may plan
    h.run()
    assert h.ended[1] == ("length", [model_token(1, p) for p in range(3, 13)])
    assert len(h.plans) == 10


def test_nothing_to_do_returns_none():
    s = Scheduler(8, 4, 2, 16)
    assert s.schedule() is None and s.idle


def test_mixed_batch_decode_rows_first_budget_and_slots():
    h = Harness(max_seqs=2, max_tokens_per_forward=6, steps_ahead=2)
    reqs = [(rid, [rid % 50] * (3 + rid), params(4 + rid % 3, stop=())) for rid in range(6)]
    h.run(reqs)
    assert all(len(p.rids) <= 2 for p in h.plans)
    assert any(0 < p.num_prefill < len(p.rids) for p in h.plans), "prefill and decode never shared a step"
    for rid, prompt, prm in reqs:
        assert h.ended[rid] == ("length", expected_output(rid, prompt, prm)[0])


# ---- aborts ------------------------------------------------------------------------------------------
def test_abort_waiting_request():
    h = Harness(max_seqs=1)
    h.add(1, [1, 2, 3], params(5, stop=()))
    h.add(2, [4, 5], params(5, stop=()))
    h.schedule()
    assert h.plans[0].rids == [1]
    h.abort(2)
    assert 2 not in h.sched.seqs and all(s.rid != 2 for s in h.sched.waiting)
    h.run()
    assert h.ended[2] == ("abort", [])
    assert all(2 not in p.rids for p in h.plans)
    assert h.sched.finished["abort"] == 1


def test_abort_running_request_with_steps_in_flight():
    h = Harness(steps_ahead=3, num_pages=16)
    h.add(1, [1, 2, 3, 4, 5], params(20, stop=()))
    h.add(2, [6, 7], params(5, stop=()))
    for _ in range(3):
        h.schedule()
    held = len(h.seq_objs[1].pages)
    assert held > 0
    free_before = h.sched.pages.num_free
    h.abort(1)
    # pages of in-flight steps are not reusable until those steps complete
    assert h.sched.pages.num_free == free_before
    assert h.sched.pages.num_pending == held
    h.sched.abort(1)  # twice: no-op
    h.sched.abort(12345)  # unknown: no-op
    h.sched.check()
    h.run()  # results for rid 1 still arrive and are ignored
    assert h.ended[1][0] == "abort"
    assert h.ended[2] == ("length", expected_output(2, [6, 7], params(5, stop=()))[0])
    assert h.sched.finished == Counter({"abort": 1, "length": 1})


def test_abort_with_nothing_in_flight_gives_the_pages_back():
    """Every step of the aborted sequence has completed, so its pages are free now: a new request that
    needs the whole pool must be planned (nothing else will ever complete to release them)."""
    h = Harness(num_pages=4, page_size=2, max_seqs=2, max_tokens_per_forward=16, steps_ahead=1)
    h.add(1, [1, 2, 3, 4, 5, 6, 8], params(20, stop=()))
    h.schedule()
    h.complete()
    assert len(h.seq_objs[1].pages) == 4 and h.sched.inflight_steps == 0
    h.abort(1)
    assert h.sched.idle
    assert h.sched.stats().free_pages == 4, "an idle scheduler with pages still held back"
    h.add(2, [9] * 8, params(0, stop=()))  # its prompt fills all 4 pages
    assert h.schedule() is not None, "stuck: the aborted sequence's pages never come back"
    h.run()
    assert h.ended[2] == ("length", [])


def test_abort_of_finished_request_is_a_no_op():
    h = Harness()
    h.run([(1, [1], params(2, stop=()))])
    h.sched.abort(1)
    h.sched.check()
    assert h.sched.finished == Counter({"length": 1})


# ---- step order --------------------------------------------------------------------------------------
def test_out_of_order_result_raises():
    h = Harness(steps_ahead=3)
    h.add(1, [1, 2, 3], params(5, stop=()))
    p0, p1 = h.schedule(), h.schedule()
    with pytest.raises(StepOrderError):
        h.sched.update(StepResult(p1.step_id, [1], [0], [0.0]))  # step 0 skipped
    h.sched.update(h.ranks.execute(p0))
    with pytest.raises(StepOrderError):  # step 0 again
        h.sched.update(StepResult(p0.step_id, [1], [0], [0.0]))
    with pytest.raises(StepOrderError):  # a step never planned
        h.sched.update(StepResult(7, [1], [0], [0.0]))


# ---- preemption --------------------------------------------------------------------------------------
def test_preemption_recomputes_prompt_plus_generated():
    # 6 pages of 2 tokens: both sequences fit alone (prompt 4 + 8 tokens = 12), not together
    h = Harness(num_pages=6, page_size=2, max_seqs=4, max_tokens_per_forward=16, steps_ahead=2)
    reqs = [(rid, prompt, params(8, stop=(), frequency_penalty=0.5)) for rid, prompt in ((1, [1, 2, 3, 4]), (2, [5, 6, 8, 9]))]
    for r in reqs:
        h.add(*r)
    h.run()
    assert h.sched.preemptions > 0
    readmitted = [a for p in h.plans for a in p.admit]
    assert len(readmitted) > 2 and max(len(a.history) for a in readmitted) > 4, "history with earlier output"
    # a readmission's prefill covers prompt and tokens generated before the preemption
    recomputes = [(p, r) for p in h.plans for r in range(p.num_prefill)
                  if p.kv_lens[r] == p.q_lens[r] and p.kv_lens[r] > 4]
    assert recomputes, "no recompute prefill longer than the prompt"
    for p, r in recomputes:
        rid = p.rids[r]
        start = sum(p.q_lens[:r])
        assert p.prefill_tokens[start : start + p.q_lens[r]] == h.true_sequence(rid, p.kv_lens[r])
    for rid, prompt, prm in reqs:
        assert h.ended[rid] == ("length", expected_output(rid, prompt, prm)[0])


def test_preemption_with_nothing_in_flight_does_not_deadlock():
    """Both sequences fit alone, not together. Results come back before the next plan (as when the
    ranks are faster than the scheduler loop), so the step that preempts has nothing in flight: the
    victim's pages must still become usable, or nothing can ever be planned again."""
    s = Scheduler(num_pages=6, page_size=2, max_seqs=4, max_tokens_per_forward=16)
    s.add(1, [1, 2, 3, 4], params(8, stop=()))
    s.add(2, [5, 6, 8, 9], params(8, stop=()))
    for _ in range(40):
        if s.idle:
            break
        plan = s.schedule()
        s.check()
        assert plan is not None, (
            f"stuck: nothing planned and nothing in flight; free={s.pages.num_free} "
            f"pending={s.pages.num_pending} waiting={[q.rid for q in s.waiting]}")
        emit = [r for r, e in zip(plan.rids, plan.emit) if e]
        s.update(StepResult(plan.step_id, emit, [model_token(r, plan.kv_lens[plan.rids.index(r)]) for r in emit],
                            [0.0] * len(emit)))
        s.check()
    assert s.idle and s.pages.num_free == 6
    assert s.preemptions > 0


@pytest.mark.parametrize("steps_ahead", [1, 2])
def test_oldest_sequence_is_not_recomputed_when_the_youngest_can_give_way(steps_ahead):
    """When the older sequence needs a page, the younger one is preempted; its pages come back once its
    in-flight steps complete, so the older one must wait for them rather than preempt itself too."""
    h = Harness(num_pages=6, page_size=2, max_seqs=4, max_tokens_per_forward=16, steps_ahead=steps_ahead)
    h.add(1, [1, 2, 3, 4], params(8, stop=()))
    h.add(2, [5, 6, 8, 9], params(8, stop=()))
    h.run()
    assert h.sched.preemptions > 0
    starts = [p.kv_lens[r] - p.q_lens[r] for p in h.plans for r, rid in enumerate(p.rids) if rid == 1]
    assert starts.count(0) == 1, f"the oldest sequence was recomputed: {starts}"


# ---- stress ------------------------------------------------------------------------------------------
def _random_requests(rng: random.Random, n: int, max_len: int):
    reqs = []
    for rid in range(n):
        plen = rng.randint(1, max_len // 2)
        mt = rng.choice([0, 1, rng.randint(1, max_len - plen)])
        stop = rng.choice([(), (STOP,), (STOP, 13), (rng.randrange(VOCAB),)])
        kw = dict(temperature=rng.choice([0.0, 0.7]), top_p=rng.choice([1.0, 0.9]), top_k=rng.choice([0, 5]),
                  seed=rng.randrange(1000), logprobs=rng.choice([-1, 0, 3]), prompt_logprobs=rng.choice([-1, -1, 0, 2]))
        reqs.append((rid * 7 + 1, [rng.randrange(VOCAB) for _ in range(plen)], params(mt, stop=stop, **kw)))
    return reqs


@pytest.mark.parametrize("seed", range(12))
def test_stress_tight_memory_with_preemptions(seed):
    rng = random.Random(seed)
    page_size = rng.choice([1, 2, 4])
    num_pages = rng.randint(4, 10)
    max_len = num_pages * page_size  # every request fits alone
    h = Harness(num_pages=num_pages, page_size=page_size, max_seqs=rng.randint(1, 6),
                max_tokens_per_forward=rng.randint(1, 12), steps_ahead=rng.randint(1, 4), seed=seed)
    h.run(_random_requests(rng, 40, max_len), abort_prob=0.01 if seed % 3 == 0 else 0.0)
    assert len(h.ended) == 40


def test_stress_preempts_and_keeps_many_steps_in_flight():
    total_preemptions = 0
    for seed in range(4):
        rng = random.Random(100 + seed)
        h = Harness(num_pages=8, page_size=2, max_seqs=6, max_tokens_per_forward=8, steps_ahead=3, seed=seed)
        reqs = [(rid, [rng.randrange(VOCAB) for _ in range(rng.randint(2, 6))], params(rng.randint(4, 10), stop=()))
                for rid in range(30)]
        h.run(reqs)
        total_preemptions += h.sched.preemptions
        assert h.max_inflight_seen == 3
        for rid, prompt, prm in reqs:
            assert h.ended[rid] == ("length", expected_output(rid, prompt, prm)[0])
    assert total_preemptions > 0


def test_stress_roomy_memory_with_aborts():
    rng = random.Random(7)
    h = Harness(num_pages=200, page_size=4, max_seqs=8, max_tokens_per_forward=24, steps_ahead=2, seed=7)
    h.run(_random_requests(rng, 80, 60), abort_prob=0.03)
    assert h.sched.preemptions == 0
    assert sum(r == "abort" for r, _ in h.ended.values()) > 0
