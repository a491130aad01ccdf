"""One rank's step: plan -> input tensors -> forward -> logits of emitting rows -> sampling -> result.

The rank keeps per-slot state on its device: the last sampled token (decode rows read their input
there, so the scheduler never needs to know it before planning the next step) and the sampling
settings sent once when a sequence takes its slot. `launch()` only enqueues device work and one
device-to-host copy; `finish()` waits for that copy, so the rank can launch step N+1 before it
finishes step N.

Under pipeline parallelism (a `Pipe`) a rank runs its stage's layers: the first stage embeds and
keeps the last tokens (the last stage sends them back), the others take the previous stage's
output, and only the last samples and reports. A plan with a negative step id is a warm-up: each
stage runs it alone, on zeros where another stage's output would be.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from toka.protocol import PromptLogprobs, StepPlan, StepResult, TopLogprobs
from workers import staging
from workers.attention import AttentionBackend, AttentionBatch, PrefixGroups, cumsum0
from workers.graphs import CudaGraphs, Pieces
from workers.layers.attention import ForwardContext
from workers.logits_processor import LogitsProcessor
from workers.pipeline import Pipe
from workers.sampling import MIN_LOGPROB, SamplingBatch, fold_seed, fused, sample_hidden

# Rows of logits materialized at once: bounds the float32 [rows, vocab] buffers of large batches.
LOGIT_CHUNK = 512
# The same for batches the fused kernel samples (no filters, processing or alternatives): their
# logits stay bf16 and only they are materialized, so four times the rows take twice the bytes of
# one float32 buffer of the chunk above, less than the warm-up's unfused peak (several of those).
# One LM-head matmul and one kernel launch for up to 2,048 rows instead of four.
FUSED_CHUNK = 4 * LOGIT_CHUNK


@dataclass
class Launched:
    """A step whose device work is enqueued. `packed` (host, pinned) receives per emitting row:
    token, its logprob, then num_top alternative ids and logprobs, all as float32 (ids < 2**24)."""

    plan: StepPlan
    rows: np.ndarray  # the plan's emitting rows
    slots: np.ndarray  # their slots
    num_top: int
    packed: torch.Tensor | None  # None on a stage before the last: it reports nothing
    done: torch.cuda.Event | None
    prompt: list[PromptLogprobs]
    # the previous launched step's `done` and this step's mark before its forward (timing events;
    # None off CUDA): between them the device ran this step's input copies, or waited for the host
    previous: torch.cuda.Event | None = None
    forward_start: torch.cuda.Event | None = None


class ModelRunner(CudaGraphs):
    def __init__(self, model, attn: AttentionBackend, max_seqs: int, page_size: int, device: torch.device,
                 scratch_page: int, max_pages_per_seq: int, raw_logprobs: bool = True, pipe: Pipe | None = None):
        self.model = model
        self.pipe = pipe
        self.attn = attn
        self.page_size = page_size
        self.device = device
        self.cuda = device.type == "cuda"
        # slot max_seqs and page scratch_page belong to no sequence: padding rows of CUDA graphs use them
        self.scratch_slot, self.scratch_page = max_seqs, scratch_page
        n = max_seqs + 1
        i64, f32 = dict(dtype=torch.int64, device=device), dict(dtype=torch.float32, device=device)
        self.last_token = torch.zeros(n, **i64)
        self.temperature = torch.zeros(n, **f32)
        self.top_p = torch.ones(n, **f32)
        self.top_k = torch.zeros(n, **i64)
        self.seed = torch.zeros(n, **i64)
        self.min_p = torch.zeros(n, **f32)
        self.raw_logprobs = raw_logprobs
        # a runner without a model only plans steps; one without the LM head (an earlier stage) never samples
        vocab = model.lm_head.vocab_size if model is not None and model.lm_head is not None else 0
        self.processor = LogitsProcessor(n, vocab, device)
        # slot -> its sequence's pages in order, filled by the plans' table writes (int32: FlashInfer's)
        self.page_table = torch.zeros(n, max_pages_per_seq, dtype=torch.int32, device=device)
        self.page_table[self.scratch_slot, 0] = scratch_page
        # host mirrors of what decides tensor shapes and code paths, so planning never reads the device
        self.logprobs = np.full(n, -1, dtype=np.int64)
        self.prompt_logprobs = np.full(n, -1, dtype=np.int64)
        self.filtered = np.zeros(n, dtype=bool)  # min-p, top-p or top-k
        self.uses_min_p = np.zeros(n, dtype=bool)
        self.sampled = np.zeros(n, dtype=bool)  # temperature > 0
        # captured decode steps by batch size (capture_graphs), without and with Hydragen groups
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.grouped_graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.min_group = 0
        # other steps' forwards by token count, captured in pieces between attention calls (capture_pieces)
        self.pieces: dict[int, Pieces] = {}
        # the graphs' fixed inputs (device; the capture methods make them at the largest size): input
        # ids (or a later stage's hidden states), positions and sequence lengths, of whole decode steps
        # (g_) and of pieces (p_, with p_out, every size's output)
        self.g_ids = self.g_pos = self.g_seq = None
        self.p_ids = self.p_pos = self.p_seq = self.p_out = None
        self._last_done: torch.cuda.Event | None = None  # the latest launched step's
        self._forward_start: torch.cuda.Event | None = None  # the step being launched's (_mark_forward)

    def to_device(self, values, dtype=torch.int64) -> torch.Tensor:
        """Host values (list or numpy) as a device tensor; one pinned, asynchronous copy on CUDA (from
        the launch's part of the staging ring, workers/staging.py)."""
        return staging.to_device(values, dtype, self.device)

    # ---- inputs --------------------------------------------------------------------------------
    def _admit(self, plan: StepPlan) -> None:
        if not plan.admit:
            return
        idx = self.to_device([a.slot for a in plan.admit])
        self.temperature[idx] = self.to_device([a.temperature for a in plan.admit], torch.float32)
        self.top_p[idx] = self.to_device([a.top_p for a in plan.admit], torch.float32)
        self.top_k[idx] = self.to_device([a.top_k for a in plan.admit])
        self.seed[idx] = self.to_device([fold_seed(a.seed) for a in plan.admit])
        self.min_p[idx] = self.to_device([a.min_p for a in plan.admit], torch.float32)
        for a in plan.admit:
            self.logprobs[a.slot] = a.logprobs
            self.prompt_logprobs[a.slot] = a.prompt_logprobs
            self.uses_min_p[a.slot] = a.min_p > 0
            self.filtered[a.slot] = a.top_p < 1.0 or a.top_k > 0 or a.min_p > 0
            self.sampled[a.slot] = a.temperature > 0
            self.processor.admit(a)

    def _write_pages(self, plan: StepPlan) -> None:
        """The plan's new page-table entries, and its page copies (before any layer appends to them)."""
        if plan.table_pages:
            w = self.to_device([plan.table_slots, plan.table_cols, plan.table_pages])
            self.page_table[w[0], w[1]] = w[2].to(torch.int32)
        if plan.copy_src:
            src, dst = self.to_device([plan.copy_src, plan.copy_dst])
            self.attn.cache.copy_pages(src, dst)

    def _table_pages(self, slots: torch.Tensor, count: torch.Tensor, indptr: torch.Tensor, total: int,
                     start: torch.Tensor | None = None) -> torch.Tensor:
        """Entries start[i] .. start[i] + count[i] - 1 of slot slots[i]'s page table, row after row
        (all [rows] int64 on the device; indptr = [0, cumsum(count)], total = its last value, from
        the host so nothing waits for the device)."""
        rows = torch.repeat_interleave(torch.arange(len(count), device=self.device), count, output_size=total)
        cols = torch.arange(total, device=self.device) - indptr[rows]
        if start is not None:
            cols += start[rows]
        return self.page_table[slots[rows], cols]

    def _attention_batch(self, slots, q_lens, kv_lens, num_prefill: int, group_rows=(), group_pages=()) -> AttentionBatch:
        """Step metadata from host lists: computed on the host with numpy, sent in one copy; the
        rows' page lists are gathered from the device page table. group_rows/group_pages: the
        plan's Hydragen groups of decode rows."""
        ps = self.page_size
        q = np.asarray(q_lens, dtype=np.int64)
        kv = np.asarray(kv_lens, dtype=np.int64)
        n = len(q)
        qo_indptr = cumsum0(q)
        num_pages = (kv + ps - 1) // ps
        page_indptr = cumsum0(num_pages)
        tokens = int(qo_indptr[-1])
        token_rows = np.repeat(np.arange(n), q) if tokens != n else np.arange(n)
        positions = kv[token_rows] - q[token_rows] + np.arange(tokens) - qo_indptr[token_rows]
        last_page_len = (kv - 1) % ps + 1
        host = [np.asarray(slots, dtype=np.int64), qo_indptr, page_indptr, kv, last_page_len, num_pages,
                token_rows, positions, kv[token_rows]]
        parts = torch.split(self.to_device(np.concatenate(host)), [len(h) for h in host])
        slots_d, qo_d, page_indptr_d, kv_d, last_d, num_pages_d, token_rows_d, positions_d, seq_lens_d = parts
        i32 = torch.int32
        groups = None
        if len(group_rows):
            groups = self._prefix_groups(slots_d, num_pages[num_prefill:], num_prefill, group_rows, group_pages)
        return AttentionBatch(
            qo_indptr=qo_d.to(i32),
            page_indptr=page_indptr_d.to(i32),
            page_indices=self._table_pages(slots_d, num_pages_d, page_indptr_d, int(page_indptr[-1])),
            last_page_len=last_d.to(i32),
            kv_lens=kv_d.to(i32),
            positions=positions_d,
            token_rows=token_rows_d.to(i32),
            seq_lens=seq_lens_d,
            q_lens_host=q,
            kv_lens_host=kv,
            qo_indptr_host=qo_indptr,
            page_indptr_host=page_indptr,
            last_page_len_host=last_page_len,
            num_prefill=num_prefill,
            groups=groups,
            page_table=self.page_table,
            slots=slots_d,
        ), slots_d

    def _prefix_groups(self, slots_d, dec_pages: np.ndarray, num_prefill: int, group_rows, group_pages) -> PrefixGroups:
        """The shared pages of each group (read from its first row's table) and every decode row's
        own pages after its group's prefix."""
        rows = np.asarray(group_rows, dtype=np.int64)
        pages = np.asarray(group_pages, dtype=np.int64)
        first = num_prefill + cumsum0(rows)[:-1]
        skip = np.zeros(len(dec_pages), dtype=np.int64)
        skip[: rows.sum()] = np.repeat(pages, rows)
        own = dec_pages - skip
        prefix_indptr, suffix_indptr = cumsum0(pages), cumsum0(own)
        host = [first, pages, prefix_indptr, skip, own, suffix_indptr]
        first_d, pages_d, prefix_indptr_d, skip_d, own_d, suffix_indptr_d = torch.split(
            self.to_device(np.concatenate(host)), [len(h) for h in host])
        dec_slots = slots_d[num_prefill:]
        return PrefixGroups(
            rows_host=rows,
            prefix_indptr_host=prefix_indptr,
            prefix_indices=self._table_pages(slots_d[first_d], pages_d, prefix_indptr_d, int(prefix_indptr[-1])),
            suffix_indptr_host=suffix_indptr,
            suffix_indices=self._table_pages(dec_slots, own_d, suffix_indptr_d, int(suffix_indptr[-1]), start=skip_d),
            suffix_start_host=skip,
        )

    def forward(self, plan: StepPlan) -> tuple[torch.Tensor, np.ndarray]:
        """Hidden states of every token of the plan, and qo_indptr (host) to find each row's."""
        self._write_pages(plan)
        graph = self._graph_for(plan)
        if graph is not None:
            return self._replay(plan, *graph)
        batch, slots = self._attention_batch(plan.slots, plan.q_lens, plan.kv_lens, plan.num_prefill,
                                             plan.group_rows, plan.group_pages)
        self.attn.plan(batch)
        inputs = self._inputs(plan, slots)
        tokens = len(batch.positions)
        size = min((s for s in self.pieces if s >= tokens), default=None)
        if size is not None:
            self.p_ids[:tokens].copy_(inputs)
            self.p_pos[:tokens].copy_(batch.positions)
            self.p_seq[:tokens].copy_(batch.seq_lens)
            self._mark_forward()
            self.pieces[size].replay(self.attn, tokens)
            return self.p_out[:tokens], batch.qo_indptr_host
        self._mark_forward()
        hidden = self.model(inputs, ForwardContext(self.attn, batch.positions, batch.seq_lens))
        return hidden, batch.qo_indptr_host

    def _inputs(self, plan: StepPlan, slots: torch.Tensor) -> torch.Tensor:
        """The first stage's token ids (the prefill tokens, then each decode row's last token), or
        the previous stage's output of this step."""
        if self.model.stage.first:
            ids = self.last_token[slots[plan.num_prefill :]]
            if plan.num_prefill:
                ids = torch.cat([self.to_device(plan.prefill_tokens), ids])
            return ids
        shape = (sum(plan.q_lens), self.model.config.hidden_size)
        if plan.step_id < 0:  # a warm-up: this stage alone
            return torch.zeros(shape, dtype=self.dtype, device=self.device)
        hidden = torch.empty(shape, dtype=self.dtype, device=self.device)
        self.pipe.recv_hidden(hidden)
        return hidden

    @property
    def dtype(self) -> torch.dtype:
        """Of the hidden states and queries: the model's (an FP8 cache's pages are not)."""
        return self.attn.dtype

    # ---- step ----------------------------------------------------------------------------------
    def launch(self, plan: StepPlan) -> Launched:
        """Enqueues the step's device work; its host-to-device copies come from the next part of the
        staging ring."""
        staging.RING.begin()
        try:
            return self._launch(plan)
        finally:
            staging.RING.end()

    @torch.inference_mode()
    def _launch(self, plan: StepPlan) -> Launched:
        stage, pipe = self.model.stage, self.pipe if plan.step_id >= 0 else None
        rows = np.flatnonzero(plan.emit)
        slots = np.asarray(plan.slots, dtype=np.int64)[rows]
        if pipe is not None and stage.first:
            pipe.take_tokens(plan.input_step, self.last_token)
        if not stage.last:
            hidden, _ = self.forward(plan)
            if pipe is not None:
                pipe.send_hidden(hidden)
                if stage.first and len(rows):
                    pipe.expect_tokens(plan.step_id, self.to_device(slots))
            return self._launched(plan, rows, slots, 0, None)
        self._admit(plan)
        hidden, qo_indptr = self.forward(plan)
        num_top = int(self.logprobs[slots].max(initial=0))
        last = qo_indptr[rows + 1] - 1  # each emitting row's last token
        positions = np.asarray(plan.kv_lens, dtype=np.int64)[rows]  # where its sampled token goes
        packed = torch.empty(len(rows), 2 + 2 * num_top, dtype=torch.float32, device=self.device)
        tokens = torch.empty(len(rows), dtype=torch.int64, device=self.device)
        chunk = self._logit_chunk(slots, num_top)
        for lo in range(0, len(rows), chunk):
            part = slice(lo, lo + chunk)
            packed[part], tokens[part] = self._sample(slots[part], last[part], positions[part], hidden, num_top)
        if pipe is not None and len(rows):
            pipe.send_tokens(tokens)
        host = torch.empty(packed.shape, dtype=torch.float32, pin_memory=self.cuda)
        host.copy_(packed, non_blocking=True)
        launched = self._launched(plan, rows, slots, num_top, host)
        launched.prompt = self._prompt_logprobs(plan, hidden, qo_indptr)  # may synchronize: after the step's end
        return launched

    def _logit_chunk(self, slots: np.ndarray, num_top: int) -> int:
        """Rows sampled at once: FUSED_CHUNK where the fused kernel takes them all (sampling.fused),
        else LOGIT_CHUNK."""
        plain = fused(self.cuda, bool(self.filtered[slots].any()), num_top, self.processor.needed(slots))
        return FUSED_CHUNK if plain else LOGIT_CHUNK

    def _mark_forward(self) -> None:
        """Records where the step being launched begins its forward on the device, after its inputs."""
        if self.cuda:
            self._forward_start = torch.cuda.Event(enable_timing=True)
            self._forward_start.record()

    def _launched(self, plan: StepPlan, rows, slots, num_top: int, packed) -> Launched:
        """The step just enqueued, its end recorded on the device (its prompt logprobs to come)."""
        done = None
        if self.cuda:
            done = torch.cuda.Event(enable_timing=True)
            done.record()
        launched = Launched(plan, rows, slots, num_top, packed, done, [], self._last_done, self._forward_start)
        self._last_done, self._forward_start = done, None
        return launched

    def device_wait(self, launched: Launched) -> float:
        """Seconds from the previous launched step's end to this step's forward on the device: its
        input copies, and any time the device waited for the host to enqueue them. 0 off CUDA. Call
        after finish(launched)."""
        if launched.previous is None or launched.forward_start is None:
            return 0.0
        return launched.previous.elapsed_time(launched.forward_start) / 1e3

    def done(self, launched: Launched) -> bool:
        """Whether the device has finished the step (finish() would not wait)."""
        return launched.done is None or launched.done.query()

    def finish(self, launched: Launched) -> StepResult | None:
        """The step's result; None on a stage before the last."""
        if launched.done is not None:
            launched.done.synchronize()
        if launched.packed is None:
            return None
        plan, k = launched.plan, launched.num_top
        values = launched.packed.numpy()
        result = StepResult(plan.step_id, np.asarray(plan.rids, dtype=np.int64)[launched.rows].tolist(),
                            values[:, 0].astype(np.int64).tolist(), values[:, 1].tolist(), prompt=launched.prompt,
                            cached_rids=plan.cached_rids, cached_tokens=plan.cached_tokens)
        wanted = self.logprobs[launched.slots]
        for i in np.flatnonzero(wanted > 0).tolist():
            want = int(wanted[i])
            result.top_rows.append(i)
            result.top.append(TopLogprobs(values[i, 2 : 2 + want].astype(np.int64).tolist(),
                                          values[i, 2 + k : 2 + k + want].tolist()))
        return result

    def step(self, plan: StepPlan) -> StepResult | None:
        return self.finish(self.launch(plan))

    def close(self) -> None:
        """After the last step: no message between stages is left unmatched."""
        if self.pipe is not None:
            self.pipe.close(self.last_token)

    def _sample(self, slots: np.ndarray, last: np.ndarray, positions: np.ndarray, hidden, num_top: int):
        slot_t, last_t, positions_t = self.to_device(np.stack([slots, last, positions]))
        processed = self.processor.needed(slots)
        batch = SamplingBatch(
            temperature=self.temperature[slot_t],
            top_p=self.top_p[slot_t],
            top_k=self.top_k[slot_t],
            seeds=self.seed[slot_t],
            positions=positions_t,
            filtered=bool(self.filtered[slots].any()),
            random=bool(self.sampled[slots].any()),
            num_top=num_top,
            min_p=self.min_p[slot_t] if self.uses_min_p[slots].any() else None,
            raw_logprobs=self.raw_logprobs,
            process=(lambda logits: self.processor.apply(logits, slots, positions)) if processed else None,
        )
        tokens, chosen, top_ids, top_lp = sample_hidden(self.model.lm_head, hidden[last_t], batch)
        if processed:
            self.processor.record(slots, tokens)
        self.last_token[slot_t] = tokens
        parts = [tokens.float()[:, None], chosen[:, None]]
        if num_top:
            parts += [top_ids.float(), top_lp]
        return torch.cat(parts, dim=1), tokens

    def _prompt_logprobs(self, plan, hidden, qo_indptr) -> list[PromptLogprobs]:
        """For prefill rows that asked: the logprob of each prompt token given the ones before it.
        Rare (echo requests), so it may synchronize."""
        out = []
        wanting = [r for r in range(plan.num_prefill) if self.prompt_logprobs[plan.slots[r]] >= 0]
        qo_indptr = qo_indptr.tolist()
        for r, following in zip(wanting, plan.prefill_next):
            lo, hi = qo_indptr[r], qo_indptr[r + 1]  # prefill rows come first: their tokens are here
            targets = plan.prefill_tokens[lo + 1 : hi] + ([following] if following >= 0 else [])
            if not targets:
                continue
            k = int(self.prompt_logprobs[plan.slots[r]])
            chosen, top, ranks = [], [], []
            for c in range(0, len(targets), LOGIT_CHUNK):  # bounded like sampling's logits
                part = targets[c : c + LOGIT_CHUNK]
                logprobs = torch.log_softmax(self.model.lm_head(hidden[lo + c : lo + c + len(part)]).float(), dim=-1)
                lp = logprobs.gather(1, self.to_device(part)[:, None])
                ranks += ((logprobs > lp).sum(dim=-1) + 1).tolist()  # 1: no token is more likely
                chosen += lp[:, 0].clamp(min=MIN_LOGPROB).tolist()
                if k > 0:
                    top_lp, top_ids = logprobs.topk(k, dim=-1)
                    top += [TopLogprobs(i, p) for i, p in zip(top_ids.tolist(), top_lp.clamp(min=MIN_LOGPROB).tolist())]
            out.append(PromptLogprobs(plan.rids[r], plan.kv_lens[r] - plan.q_lens[r] + 1, chosen, top, ranks))
        return out

