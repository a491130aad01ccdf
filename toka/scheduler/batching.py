"""Continuous batching behind two calls: `schedule()` makes the next step plan, `update()` takes a
step's sampled tokens. Pure bookkeeping, no sockets, so the tests drive it directly.

A sequence's known tokens are its prompt plus the tokens accepted so far; `computed` of them have
their KV in the cache (or will, once the steps in flight run). Steps run ahead of their results:
decode rows read their input token on the rank, so a sequence keeps decoding while its previous
tokens are still in flight (`inflight` counts them). A preempted sequence gives back its pages and
slot and is recomputed from its known tokens once its in-flight results are back.

Under pipeline parallelism with P stages a decode row reads a token that the last stage sends back
to the first: a sequence decodes in a step only if its previous step is at least P steps back (or
its result is in), so the running sequences fall into P interleaved micro-batches and the first
stage does not wait for a token while the others still run the steps before.
"""

from __future__ import annotations

import bisect
import itertools
from collections import Counter, deque
from dataclasses import dataclass, field

from toka.arith import cdiv
from toka.protocol import SamplingParams, SeqParams, Stats, StepPlan, StepResult
from toka.scheduler.hydragen import group_by_prefix
from toka.scheduler.pages import PageAllocator, page_keys

# After a preemption, admission keeps free pages for the output the running sequences may still
# write (this share of it, at most RESERVE_CLIP tokens a sequence): set to 1 by each preemption, it
# decays by RESERVE_DECAY a step to 0. Without it a preempted sequence comes back as soon as pages
# free up, and the running ones' growth preempts it again (recomputing its tokens each time); kept
# always, it would starve batches whose sequences end early (EOS, stop strings).
RESERVE_DECAY, RESERVE_CLIP = 0.001, 4096


class StepOrderError(RuntimeError):
    """A result arrived out of order or a step was lost: the ranks and we no longer agree."""


@dataclass(eq=False)  # identity: list.remove() must not compare every field
class Sequence:
    rid: int
    prompt: list[int]
    params: SamplingParams
    order: int  # admission order; the youngest running sequence is preempted first
    generated: list[int] = field(default_factory=list)
    pages: list[int] = field(default_factory=list)
    slot: int = -1
    computed: int = 0
    target: int = 0  # known tokens at admission: prefill ends when computed reaches it
    inflight: int = 0
    last_step: int = -1
    table_len: int = 0  # how many of `pages` the ranks' page table holds for `slot`
    keys: list[bytes] = field(default_factory=list)  # prefix-cache keys of the full pages of the known tokens
    keyed: int = 0  # leading pages that are prefix-cache pages (shareable, never written again)
    cached: int = -1  # prompt tokens found in the prefix cache at the first admission (-1: not admitted yet)
    copy_from: int = -1  # a cached page the next step copies into its last page (_start), held until then

    @property
    def known(self) -> list[int]:
        return self.prompt + self.generated if self.generated else self.prompt

    @property
    def prefilled(self) -> bool:
        return self.slot >= 0 and self.computed >= self.target

    @property
    def wants_more(self) -> bool:
        return len(self.generated) + self.inflight < max(self.params.max_tokens, 1)


class Scheduler:
    def __init__(self, num_pages: int, page_size: int, max_seqs: int, max_tokens_per_forward: int,
                 prefix_caching: bool = True, hydragen: tuple[int, int] | None = None, stages: int = 1):
        self.pages = PageAllocator(num_pages)
        self.stages = stages  # pipeline stages: the fewest steps between two of a sequence's decode rows
        self.prefix_caching = prefix_caching
        self.hydragen = hydragen  # (min rows per group, min shared prefix in pages), or off
        self.page_size = page_size
        self.max_tokens = max_tokens_per_forward
        self.free_slots = list(range(max_seqs - 1, -1, -1))
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # by `order`, so a victim is never older than what is planned
        self.seqs: dict[int, Sequence] = {}
        self.next_step = 0
        self.done_step = -1
        self._order = itertools.count()
        self.tokens_generated = 0
        self.finished: Counter[str] = Counter()
        self.preemptions = 0
        self.prefix_hit_tokens = 0
        self.grouped_rows = 0
        self.reserve_ratio = 0.0
        self._hashed: tuple[list[int] | None, list[bytes]] = (None, [])  # the last token list hashed, its keys
        self._written: set[int] = set()  # full pages the step being planned writes (prefill chunks complete them)

    # ---- requests ------------------------------------------------------------------------------
    def add(self, rid: int, prompt: list[int], params: SamplingParams, n: int = 1) -> None:
        """Sequences rid .. rid + n - 1 (a Submit's choices): they share the one prompt list."""
        for i in range(n):
            seq = Sequence(rid + i, prompt, params.for_choice(i), next(self._order))
            self.seqs[rid + i] = seq
            self.waiting.append(seq)

    def abort(self, rid: int) -> None:
        seq = self.seqs.pop(rid, None)
        if seq is None:
            return
        if seq.slot >= 0:
            self._evict(seq)
        else:
            self.waiting.remove(seq)
        self.finished["abort"] += 1

    @property
    def inflight_steps(self) -> int:
        return self.next_step - 1 - self.done_step

    @property
    def idle(self) -> bool:
        return not self.seqs and self.inflight_steps == 0

    # ---- planning ------------------------------------------------------------------------------
    def schedule(self) -> StepPlan | None:
        budget = self.max_tokens
        self._written.clear()
        decode: list[Sequence] = []
        prefill: list[tuple[Sequence, int]] = []
        admit: list[Sequence] = []

        ps = self.page_size
        # a sequence in a later step decodes in a later one (always true without pipeline stages)
        recent = max(self.next_step - self.stages, self.done_step)
        for seq in list(self.running):  # every running sequence, every step: kept to plain field reads
            if budget == 0:
                break
            if seq.slot < 0 or seq.computed < seq.target or not seq.wants_more or seq.last_step > recent:
                continue  # not decoding (or, with pipeline stages, its last token is not back yet)
            # room in its last page (15 steps in 16) needs no allocation
            if seq.computed < len(seq.pages) * ps or self._grow(seq, seq.computed + 1):
                decode.append(seq)
                budget -= 1
        for seq in self.running:
            if budget > 0 and seq.slot >= 0 and not seq.prefilled:
                n = self._chunk(seq, budget)
                if n:
                    prefill.append((seq, n))
                    budget -= n
        reserve = self._reserve() if self.reserve_ratio and self.waiting and self.free_slots else 0.0
        deferred: list[Sequence] = []  # choices that copy a page this step writes: first in line next step
        while budget > 0 and self.waiting and self.free_slots and self.waiting[0].inflight == 0:
            seq = self.waiting[0]
            if reserve and self.running and self.pages.num_free - cdiv(len(seq.known), self.page_size) < reserve:
                break  # the running sequences' growth would preempt it (or them) soon
            # a prompt's choices share its list: after one waits, the others do without a look
            if (deferred and seq.known is deferred[-1].known) or not self._start(seq):
                deferred.append(self.waiting.popleft())
                continue
            reserve += self.reserve_ratio * self._future_pages(seq)
            n = self._chunk(seq, budget)
            if n == 0:
                # give the matched pages back; steps in flight may read them, so not before those end
                self.pages.release(seq.pages + ([seq.copy_from] if seq.copy_from >= 0 else []),
                                   after_step=self.next_step - 1)
                seq.pages, seq.computed, seq.keyed, seq.copy_from = [], 0, 0, -1
                break
            self.waiting.popleft()
            seq.slot = self.free_slots.pop()
            bisect.insort(self.running, seq, key=lambda s: s.order)
            admit.append(seq)
            prefill.append((seq, n))
            budget -= n
        self.waiting.extendleft(reversed(deferred))
        if not decode and not prefill:
            return None
        return self._plan(prefill, decode, admit)

    def _future_pages(self, seq: Sequence) -> int:
        """Pages `seq` may still need: to its prompt plus max_tokens (clipped), less what it holds."""
        final = len(seq.prompt) + min(seq.params.max_tokens, RESERVE_CLIP)
        return max(0, cdiv(final, self.page_size) - len(seq.pages))

    def _reserve(self) -> float:
        return self.reserve_ratio * sum(self._future_pages(s) for s in self.running)

    def _start(self, seq: Sequence) -> bool:
        """Prepares a waiting sequence's prefill: everything it knows, less the full pages found in
        the prefix cache (never the last token: its logits are needed). Where every page of what it
        knows is cached (n choices of a prompt of whole pages, after the first), the last one is
        copied into a page of its own, where only the last token is recomputed: a cached page is
        never written, and recomputing its page_size tokens for each choice is ~16 times the work.
        False (nothing held) where that page is one this step writes: the sequence waits a step, and
        those behind it go on."""
        known = seq.known
        ps = self.page_size
        seq.target = len(known)
        if self.prefix_caching and seq.params.prompt_logprobs < 0:  # prompt logprobs need every position
            if len(seq.keys) != len(known) // ps:  # keys depend only on the known tokens
                seq.keys = self._page_keys(known)
            seq.pages = self.pages.match(seq.keys[: (len(known) - 1) // ps])
            seq.keyed = len(seq.pages)
            last = self.pages.match(seq.keys[-1:]) if len(known) % ps == 0 and seq.keyed == len(seq.keys) - 1 else []
            if last and last[0] in self._written:
                # this step writes it, and a step copies before it appends: copy it next step
                self.pages.release(seq.pages + last, after_step=self.next_step - 1)
                seq.pages, seq.keyed = [], 0
                return False
            if last and self.pages.num_free:  # (matching it took it off the evictable pages)
                seq.copy_from = last[0]
                seq.pages += self.pages.alloc(1)
                seq.computed = len(known) - 1
                return True
            if last:  # no page to copy it into: recompute it
                self.pages.release(last, after_step=self.next_step - 1)
        seq.keyed = len(seq.pages)
        seq.computed = len(seq.pages) * ps
        return True

    def _page_keys(self, known: list[int]) -> list[bytes]:
        """page_keys(known), hashed once for the n choices of a prompt: they share its list and are
        admitted one after another."""
        if known is not self._hashed[0]:
            self._hashed = (known, page_keys(known, self.page_size))
        return self._hashed[1]

    def _chunk(self, seq: Sequence, budget: int) -> int:
        """Prefill tokens for `seq` this step: as many as the budget and free pages allow. The full
        pages it completes enter the prefix cache now: rows planned after it, even in this step,
        may read them (a step appends all its K/V before attending)."""
        n = min(budget, seq.target - seq.computed)
        room = (len(seq.pages) + self.pages.num_free) * self.page_size - seq.computed
        n = min(n, room)
        if n <= 0 or not self._grow(seq, seq.computed + n, preempt=False):
            return 0
        ps = self.page_size
        for i in range(seq.computed // ps, min(seq.computed + n, len(seq.keys) * ps) // ps):
            self._written.add(seq.pages[i])
            if self.pages.register(seq.pages[i], seq.keys[i]) and i == seq.keyed:
                seq.keyed += 1
        return n

    def _grow(self, seq: Sequence, kv_len: int, preempt: bool = True) -> bool:
        """Gives `seq` pages for kv_len tokens, preempting the youngest sequences if needed."""
        need = cdiv(kv_len, self.page_size) - len(seq.pages)
        while need > self.pages.num_free:
            if not preempt or need <= self.pages.num_free + self.pages.num_pending:
                return False  # pages are on their way back: wait for them rather than preempt more
            victim = self.running[-1]
            self._preempt(victim)
            if victim is seq:
                return False
        if need > 0:
            seq.pages.extend(self.pages.alloc(need))
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.reserve_ratio = 1.0
        self._evict(seq)
        self.waiting.appendleft(seq)
        self.preemptions += 1

    def _evict(self, seq: Sequence) -> None:
        """Takes `seq` off the ranks: its pages return once the steps using them are done."""
        self.pages.release(seq.pages, after_step=seq.last_step)
        seq.pages, seq.computed, seq.table_len, seq.keyed = [], 0, 0, 0
        self.free_slots.append(seq.slot)
        seq.slot = -1
        self.running.remove(seq)

    def _plan(self, prefill, decode, admit) -> StepPlan:
        self.reserve_ratio = max(0.0, self.reserve_ratio - RESERVE_DECAY)
        groups, prefixes = [], []
        if self.hydragen and len(decode) >= self.hydragen[0]:
            decode, groups, prefixes = group_by_prefix(decode, *self.hydragen)
            self.grouped_rows += sum(groups)
        first = []  # first admissions that found prompt tokens in the prefix cache
        copies = [(s.copy_from, s.pages[-1]) for s in admit if s.copy_from >= 0]
        for seq in admit:
            if seq.copy_from >= 0:  # the step reads the cached page, then no longer needs it
                self.pages.release([seq.copy_from], after_step=self.next_step)
                seq.copy_from = -1
            self.prefix_hit_tokens += seq.computed  # before this step's tokens: what the cache held
            if seq.cached < 0:
                seq.cached = min(seq.computed, len(seq.prompt))
                if seq.cached:
                    first.append(seq)
        step = self.next_step
        self.next_step += 1
        input_step = max(s.last_step for s in decode) if decode and self.stages > 1 else -1
        rows = [s for s, _ in prefill] + decode
        q_lens = [n for _, n in prefill] + [1] * len(decode)
        tokens: list[int] = []
        prefill_next: list[int] = []
        for seq, n in prefill:
            known = seq.known
            tokens.extend(known[seq.computed : seq.computed + n])
            if seq.params.prompt_logprobs >= 0:
                after = seq.computed + n
                prefill_next.append(known[after] if after < len(known) else -1)
        emit, kv_lens, table_slots, table_cols, table_pages = [], [], [], [], []
        ps = self.page_size
        for seq, q in zip(rows, q_lens):
            seq.computed += q
            seq.last_step = step
            done = seq.computed >= seq.target
            emit.append(done)
            seq.inflight += done
            kv_lens.append(seq.computed)
            used = (seq.computed + ps - 1) // ps
            if used > seq.table_len:  # a page each page_size tokens: most decode rows send none
                table_slots.extend([seq.slot] * (used - seq.table_len))
                table_cols.extend(range(seq.table_len, used))
                table_pages.extend(seq.pages[seq.table_len : used])
                seq.table_len = used
        return StepPlan(
            step_id=step,
            rids=[s.rid for s in rows],
            slots=[s.slot for s in rows],
            q_lens=q_lens,
            kv_lens=kv_lens,
            emit=emit,
            num_prefill=len(prefill),
            prefill_tokens=tokens,
            table_slots=table_slots,
            table_cols=table_cols,
            table_pages=table_pages,
            admit=[self._seq_params(s) for s in admit],
            group_rows=groups,
            group_pages=prefixes,
            cached_rids=[s.rid for s in first],
            cached_tokens=[s.cached for s in first],
            prefill_next=prefill_next,
            input_step=input_step,
            copy_src=[src for src, _ in copies],
            copy_dst=[dst for _, dst in copies],
        )

    @staticmethod
    def _seq_params(seq: Sequence) -> SeqParams:
        p = seq.params
        return SeqParams(
            slot=seq.slot, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, seed=p.seed,
            logprobs=p.logprobs, prompt_logprobs=p.prompt_logprobs, min_p=p.min_p,
            repetition_penalty=p.repetition_penalty, frequency_penalty=p.frequency_penalty,
            presence_penalty=p.presence_penalty, logit_bias=p.logit_bias, min_tokens=p.min_tokens,
            stop_token_ids=p.stop_token_ids if p.min_tokens else [], prompt_len=len(seq.prompt),
            history=seq.known if p.penalized else [],
        )

    # ---- results -------------------------------------------------------------------------------
    def update(self, result: StepResult) -> list[tuple[int, str]]:
        """Takes one step's tokens; returns the (rid, reason) of sequences that ended."""
        if result.step_id != self.done_step + 1:
            raise StepOrderError(f"expected the result of step {self.done_step + 1}, got {result.step_id}")
        self.done_step = result.step_id
        ended = []
        for rid, token in zip(result.rids, result.tokens):
            seq = self.seqs.get(rid)
            if seq is None:
                continue  # aborted or ended while this step was in flight
            seq.inflight -= 1
            keep, reason = seq.params.accept(token, len(seq.generated))
            if keep:
                seq.generated.append(token)
                self.tokens_generated += 1
            if reason is not None:
                ended.append((rid, reason))
                self.finished[reason] += 1
                del self.seqs[rid]
                if seq.slot >= 0:
                    self._evict(seq)
                else:
                    self.waiting.remove(seq)
        self.pages.completed(result.step_id)
        return ended

    def stats(self) -> Stats:
        return Stats(
            running=len(self.running),
            waiting=len(self.waiting),
            free_pages=self.pages.num_free,
            total_pages=self.pages.num_pages,
            tokens_generated=self.tokens_generated,
            finished=dict(self.finished),
            preemptions=self.preemptions,
            cached_pages=self.pages.num_cached,
            prefix_hit_tokens=self.prefix_hit_tokens,
            grouped_rows=self.grouped_rows,
            steps=self.done_step + 1,
        )

    def check(self) -> None:
        self.pages.check()
        held = Counter(p for s in self.running for p in s.pages)
        assert held == self.pages._refs, "page reference counts differ from the sequences holding them"
        assert all(len(set(s.pages)) == len(s.pages) for s in self.running), "a sequence holds a page twice"
        slots = [s.slot for s in self.running]
        assert len(slots) == len(set(slots)) and -1 not in slots
        assert not set(slots) & set(self.free_slots)
        assert all(s.slot == -1 and not s.pages for s in self.waiting)
