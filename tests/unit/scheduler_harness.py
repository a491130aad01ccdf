"""A scheduler driven by simulated ranks, for the scheduler's tests: plans run in order, up to K in
flight, each answered with the token a deterministic fake model gives. The fake ranks keep a paged
token cache and a slot -> last token table like the real ones, and check on every step that each
row's whole context read back through its page table is exactly the request's prompt followed by the
model's tokens. With pipeline stages the fake first stage sees a step's tokens only once a plan's
`input_step` asks for them, as the real one receives them from the last stage."""

from __future__ import annotations

import random
from collections import Counter, deque

from toka.arith import cdiv
from toka.protocol import SamplingParams, StepPlan, StepResult
from toka.scheduler.batching import Scheduler

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
