"""Scheduler driven by simulated ranks: plans run in order, up to K in flight, each answered with the
token a deterministic fake model gives. The fake ranks keep a paged token cache and a slot -> last
token table like the real ones, and check on every step that each row's whole context read back
through its page table is exactly the request's prompt followed by the model's tokens. With pipeline
stages the fake first stage sees a step's tokens only once a plan's `input_step` asks for them, as
the real one receives them from the last stage."""

from __future__ import annotations

import random
from collections import Counter, deque

import pytest

from toka.arith import cdiv
from toka.protocol import SamplingParams, StepPlan, StepResult
from toka.scheduler.batching import Scheduler, StepOrderError

STOP = 7
VOCAB = 50


def model_token(rid: int, position: int) -> int:
    """The fake model: the token sampled to take `position` of request `rid`."""
    return (rid * 31 + position) % VOCAB


def expected_output(rid: int, prompt: list[int], params: SamplingParams) -> tuple[list[int], str]:
    out: list[int] = []
    if params.max_tokens == 0:
        return out, "length"
    for i in range(params.max_tokens):
        t = model_token(rid, len(prompt) + i)
        if t in params.stop_token_ids:
            return out, "stop"
        out.append(t)
    return out, "length"


class FakeRanks:
    """What the ranks do with a plan, on tokens instead of tensors, with checks on every plan."""

    def __init__(self, h: "Harness"):
        self.h = h
        self.cache: dict[int, list[int | None]] = {}  # page -> the token at each offset
        self.last_token: dict[int, int] = {}  # slot -> last sampled token
        self.slot_rid: dict[int, int] = {}  # slot -> the rid its settings were admitted for
        self.table: dict[int, list[int]] = {}  # slot -> pages, as the plans' writes left it
        self.next_step = 0
        self.on_the_way: deque[tuple[int, int, int]] = deque()  # pipeline: (step, slot, token) not yet taken

    def execute(self, plan: StepPlan) -> StepResult:
        h, ps = self.h, self.h.page_size
        assert plan.step_id == self.next_step, "plans must run in order"
        self.next_step += 1
        for a in plan.admit:
            rid = plan.rids[plan.slots.index(a.slot)]
            p = h.requests[rid][1]
            assert (a.temperature, a.top_p, a.top_k, a.seed, a.logprobs, a.prompt_logprobs) == (
                p.temperature, p.top_p, p.top_k, p.seed, p.logprobs, p.prompt_logprobs)
            self.slot_rid[a.slot] = rid
            assert a.prompt_len == len(h.requests[rid][0])
            if p.penalized:  # the counts start from every known token: prompt, then earlier output
                assert a.history == h.true_sequence(rid, len(a.history)) and len(a.history) >= a.prompt_len
            else:
                assert a.history == []
        while self.on_the_way and self.on_the_way[0][0] <= plan.input_step:
            _, slot, tok = self.on_the_way.popleft()
            self.last_token[slot] = tok
        tokens_in = list(plan.prefill_tokens)
        self.rows_pages = apply_table_writes(self.table, plan, ps)
        for src, dst in zip(plan.copy_src, plan.copy_dst, strict=True):
            self.cache[dst] = list(self.cache[src])
        result = StepResult(plan.step_id, [], [], [])
        cursor = 0
        for r, rid in enumerate(plan.rids):
            slot, q, kv = plan.slots[r], plan.q_lens[r], plan.kv_lens[r]
            assert self.slot_rid.get(slot) == rid, f"row {r}: slot {slot} was not admitted for rid {rid}"
            if r < plan.num_prefill:
                inputs = tokens_in[cursor : cursor + q]
                cursor += q
            else:
                inputs = [self.last_token[slot]]
            pages = self.rows_pages[r]
            for i, tok in enumerate(inputs):
                pos = kv - q + i
                self.cache.setdefault(pages[pos // ps], [None] * ps)[pos % ps] = tok
            context = [self.cache[pages[p // ps]][p % ps] for p in range(kv)]
            assert context == h.true_sequence(rid, kv), f"step {plan.step_id} rid {rid}: wrong KV context"
            if plan.emit[r]:
                tok = model_token(rid, kv)
                if h.stages > 1:
                    self.on_the_way.append((plan.step_id, slot, tok))
                else:
                    self.last_token[slot] = tok
                result.rids.append(rid)
                result.tokens.append(tok)
                result.logprobs.append(-0.5)
                h.emitted_at[(plan.step_id, rid)] = kv
        assert cursor == len(tokens_in)
        return result


def apply_table_writes(table: dict[int, list[int]], plan: StepPlan, page_size: int) -> list[list[int]]:
    """What a rank does with a plan's page-table writes; returns each row's pages."""
    assert len(plan.table_slots) == len(plan.table_cols) == len(plan.table_pages)
    for slot, col, page in zip(plan.table_slots, plan.table_cols, plan.table_pages):
        row = table.setdefault(slot, [])
        assert col <= len(row), "a page-table write leaves a gap"
        row[col:col + 1] = [page]
    for slot, kv in zip(plan.slots, plan.kv_lens):
        assert len(table.get(slot, [])) >= cdiv(kv, page_size), f"slot {slot}: pages for {kv} tokens never sent"
    return [table[slot][: cdiv(kv, page_size)] for slot, kv in zip(plan.slots, plan.kv_lens)]


class Harness:
    def __init__(self, num_pages=64, page_size=4, max_seqs=8, max_tokens_per_forward=32, steps_ahead=2, seed=0,
                 stages=1):
        self.sched = Scheduler(num_pages, page_size, max_seqs, max_tokens_per_forward, stages=stages)
        self.stages = stages
        self.num_pages, self.page_size = num_pages, page_size
        self.max_seqs, self.budget, self.K = max_seqs, max_tokens_per_forward, steps_ahead
        self.rng = random.Random(seed)
        self.ranks = FakeRanks(self)
        self.inflight: deque[StepPlan] = deque()
        self.requests: dict[int, tuple[list[int], SamplingParams]] = {}
        self.seq_objs = {}
        self.live: dict[int, list[int]] = {}  # server side: tokens accepted so far
        self.ended: dict[int, tuple[str, list[int]]] = {}
        self.emitted_at: dict[tuple[int, int], int] = {}
        self.admitted_known: dict[int, int] = {}  # rid -> known tokens when (re)admitted
        self.page_last_use: dict[int, tuple[int, int]] = {}  # page -> (rid, step)
        self.plans: list[StepPlan] = []
        self.max_inflight_seen = 0
        self.table: dict[int, list[int]] = {}  # the ranks' page table as of the last planned step

    # ---- what the sequences are -------------------------------------------------------------------
    def true_sequence(self, rid: int, n: int) -> list[int]:
        prompt = self.requests[rid][0]
        return [prompt[i] if i < len(prompt) else model_token(rid, i) for i in range(n)]

    # ---- driving --------------------------------------------------------------------------------
    def add(self, rid: int, prompt: list[int], params: SamplingParams) -> None:
        self.requests[rid] = (prompt, params)
        self.sched.add(rid, prompt, params)
        self.seq_objs[rid] = self.sched.seqs[rid]
        self.live[rid] = []
        self.sched.check()

    def abort(self, rid: int) -> None:
        self.sched.abort(rid)
        self.sched.check()
        if rid in self.live:
            self.ended[rid] = ("abort", self.live.pop(rid))

    def schedule(self) -> StepPlan | None:
        done = self.sched.done_step
        plan = self.sched.schedule()
        self.sched.check()
        if plan is not None:
            self.check_plan(plan)
            self.check_micro_batches(plan, done)
            self.inflight.append(plan)
            self.plans.append(plan)
            self.max_inflight_seen = max(self.max_inflight_seen, len(self.inflight))
        return plan

    def complete(self) -> list[tuple[int, str]]:
        plan = self.inflight.popleft()
        result = self.ranks.execute(plan)
        ended = self.sched.update(result)
        self.sched.check()
        self.check_result(result, ended)
        return ended

    def check_plan(self, plan: StepPlan) -> None:
        s, ps = self.sched, self.page_size
        rows = len(plan.rids)
        assert rows > 0
        assert len(plan.slots) == len(plan.q_lens) == len(plan.kv_lens) == len(plan.emit) == rows
        assert rows <= self.max_seqs
        assert sum(plan.q_lens) <= self.budget, "token budget exceeded"
        assert len(set(plan.rids)) == rows and len(set(plan.slots)) == rows
        assert all(0 <= sl < self.max_seqs for sl in plan.slots)
        assert 0 <= plan.num_prefill <= rows
        assert len(plan.prefill_tokens) == sum(plan.q_lens[: plan.num_prefill])
        assert all(q == 1 for q in plan.q_lens[plan.num_prefill :]), "decode rows compute one token"
        assert all(plan.emit[plan.num_prefill :]), "decode rows always sample"
        assert all(0 < q <= kv for q, kv in zip(plan.q_lens, plan.kv_lens))
        rows_pages = apply_table_writes(self.table, plan, ps)
        used = [p for pages in rows_pages for p in pages]
        # a row writes the pages of its new tokens; other rows may share (read) only full cached pages
        written = [p for r, pages in enumerate(rows_pages) for p in pages[(plan.kv_lens[r] - plan.q_lens[r]) // ps :]]
        assert len(set(written)) == len(written), "one page written by two rows"
        assert set(plan.copy_dst) <= set(written) and len(set(plan.copy_dst)) == len(plan.copy_dst), \
            "a page copied into is its row's own"
        assert not set(plan.copy_src) & set(written), "a copied page is written in the same step"
        assert all(0 <= p < self.num_pages for p in used)
        assert not set(used) & set(s.pages._free), "a planned page is free"
        admitted = {a.slot for a in plan.admit}
        assert len(plan.table_pages) <= sum(cdiv(kv, ps) if sl in admitted else cdiv(q, ps) + 1
                                            for sl, q, kv in zip(plan.slots, plan.q_lens, plan.kv_lens)), "pages sent again"
        wanting = []
        for r, rid in enumerate(plan.rids):
            kv, q = plan.kv_lens[r], plan.q_lens[r]
            assert rid in self.live, "a plan row for a request that ended or was aborted"
            prompt, params = self.requests[rid]
            known = len(prompt) + len(self.live[rid])
            if r < plan.num_prefill:
                if plan.slots[r] in admitted:  # (re)admission: prefill everything known but cached pages
                    self.admitted_known[rid] = known
                    copied = rows_pages[r][-1] in plan.copy_dst
                    if copied:  # every page cached: the last one copied, only the last token computed
                        assert q == 1 and kv == known and known % ps == 0, "a copy only for a prompt of whole pages"
                    else:
                        assert (kv - q) % ps == 0 and kv - q < known, "cached prefix: whole pages, never the last token"
                # prefill tokens are the prompt followed by what was generated so far
                assert kv <= self.admitted_known[rid]
                assert plan.emit[r] == (kv == self.admitted_known[rid])
                if params.prompt_logprobs >= 0:
                    wanting.append(r)
            else:
                assert params.max_tokens > 0, "a prompt-only request decodes"
            for i, p in enumerate(rows_pages[r]):
                owner = self.page_last_use.get(p)
                if i >= (kv - q) // ps and owner is not None and owner[0] != rid and owner[1] < plan.step_id:
                    # a page is rewritten for another request only once every step that used it completed
                    assert owner[1] <= s.done_step, f"page {p} reused while step {owner[1]} is in flight"
                self.page_last_use[p] = (rid, plan.step_id)
        # prompt-logprob rows get the token after their chunk
        assert len(plan.prefill_next) == len(wanting)
        cursor = 0
        offsets = {}
        for r in range(plan.num_prefill):
            offsets[r] = cursor
            chunk = plan.prefill_tokens[cursor : cursor + plan.q_lens[r]]
            cursor += plan.q_lens[r]
            kv = plan.kv_lens[r]
            assert chunk == self.true_sequence(plan.rids[r], kv)[kv - plan.q_lens[r] :]
        for r, nxt in zip(wanting, plan.prefill_next):
            rid, kv = plan.rids[r], plan.kv_lens[r]
            known = self.admitted_known[rid]
            assert nxt == (self.true_sequence(rid, known)[kv] if kv < known else -1)
        admitted_slots = {a.slot for a in plan.admit}
        for r in range(plan.num_prefill):
            if plan.kv_lens[r] == plan.q_lens[r]:
                assert plan.slots[r] in admitted_slots, "a (re)admitted sequence without its settings"

    def check_micro_batches(self, plan: StepPlan, done: int) -> None:
        """With pipeline stages: a decode row's previous step is `stages` steps back, or its result was
        in when the plan was made, so the first stage never waits on a step still in the pipeline."""
        if self.stages == 1:
            assert plan.input_step == -1
            return
        previous = [max(st for st, p in enumerate(self.plans) if rid in p.rids)
                    for rid in plan.rids[plan.num_prefill :]]
        for step in previous:
            assert step <= plan.step_id - self.stages or step <= done, f"step {plan.step_id} decodes after {step}"
        assert plan.input_step == max(previous, default=-1)

    def check_result(self, result: StepResult, ended: list[tuple[int, str]]) -> None:
        mine = []
        for rid, tok in zip(result.rids, result.tokens):
            if rid not in self.live:
                continue
            prompt, params = self.requests[rid]
            gen = self.live[rid]
            assert self.emitted_at[(result.step_id, rid)] == len(prompt) + len(gen), \
                f"rid {rid}: a token sampled for the wrong position"
            keep, reason = params.accept(tok, len(gen))
            if keep:
                gen.append(tok)
            if reason is not None:
                mine.append((rid, reason))
                self.ended[rid] = (reason, self.live.pop(rid))
        assert sorted(ended) == sorted(mine)
        for rid, gen in self.live.items():
            assert self.seq_objs[rid].generated == gen

    def run(self, arrivals=(), abort_prob=0.0, max_iters=200_000):
        """Interleaves arrivals, aborts, planning (up to K in flight) and results until all is done."""
        arrivals = deque(arrivals)
        rng = self.rng
        for _ in range(max_iters):
            if arrivals and (rng.random() < 0.3 or (self.sched.idle and not self.inflight)):
                self.add(*arrivals.popleft())
                continue
            if abort_prob and self.live and rng.random() < abort_prob:
                self.abort(rng.choice(sorted(self.live)))
                continue
            plan = None
            if len(self.inflight) < self.K and rng.random() < 0.7:
                plan = self.schedule()
                if plan is not None:
                    continue
            if self.inflight:
                self.complete()
                continue
            if plan is None and len(self.inflight) < self.K:
                plan = self.schedule()
                if plan is not None:
                    continue
            if not arrivals:
                assert self.sched.idle, f"stuck: nothing planned, nothing in flight, {len(self.live)} live"
                break
        else:
            raise AssertionError("did not finish: livelock?")
        self.final_checks()

    def final_checks(self):
        s = self.sched
        assert not self.live and not self.inflight
        assert s.idle and not s.running and not s.waiting and not s.seqs
        assert s.pages.num_free == self.num_pages, "pages leaked"
        assert s.pages.num_pending == 0
        assert sorted(s.free_slots) == list(range(self.max_seqs)), "slots leaked"
        for rid, (reason, toks) in self.ended.items():
            want_toks, want_reason = expected_output(rid, *self.requests[rid])
            if reason == "abort":
                assert toks == want_toks[: len(toks)]
            else:
                assert (reason, toks) == (want_reason, want_toks), f"rid {rid}"
                assert self.seq_objs[rid].generated == toks
        st = s.stats()
        assert st.finished == {k: v for k, v in Counter(r for r, _ in self.ended.values()).items()}
        assert st.tokens_generated == sum(len(t) for r, t in self.ended.values())
        assert st.running == st.waiting == 0 and st.free_pages == st.total_pages == self.num_pages
        assert st.steps == len(self.plans)


def params(max_tokens, stop=(STOP,), **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, stop_token_ids=list(stop), **kw)


def first_stop_distance(rid: int, start: int) -> int:
    """How many tokens the fake model gives before it samples STOP."""
    i = 0
    while model_token(rid, start + i) != STOP:
        i += 1
    return i


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
