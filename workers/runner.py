"""One rank's step: plan -> input tensors -> forward -> logits of emitting rows -> sampling -> result.

The rank keeps per-slot state on its device: the last sampled token (decode rows read their input
there, so the scheduler never needs to know it before planning the next step) and the sampling
settings sent once when a sequence takes its slot. `launch()` only enqueues device work and one
device-to-host copy; `finish()` waits for that copy, so the rank can launch step N+1 before it
finishes step N.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from toka.protocol import PromptLogprobs, StepPlan, StepResult, TopLogprobs
from workers.attention import AttentionBackend, AttentionBatch
from workers.layers.attention import ForwardContext
from workers.sampling import MIN_LOGPROB, SamplingBatch, fold_seed, sample

# Rows of logits materialized at once: bounds the float32 [rows, vocab] buffers of large batches.
LOGIT_CHUNK = 512


@dataclass
class Launched:
    """A step whose device work is enqueued. `packed` (host, pinned) receives per emitting row:
    token, its logprob, then num_top alternative ids and logprobs, all as float32 (ids < 2**24)."""

    plan: StepPlan
    rows: list[int]
    num_top: int
    packed: torch.Tensor
    done: torch.cuda.Event | None
    prompt: list[PromptLogprobs]


class ModelRunner:
    def __init__(self, model, attn: AttentionBackend, max_seqs: int, page_size: int, device: torch.device,
                 scratch_page: int):
        self.model = model
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
        # host mirrors of what decides tensor shapes, so planning never reads the device
        self.logprobs = [-1] * n
        self.prompt_logprobs = [-1] * n
        self.filtered = [False] * n
        self.sampled = [False] * n  # temperature > 0
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def to_device(self, values, dtype=torch.int64) -> torch.Tensor:
        """A host list as a device tensor; pinned and asynchronous on CUDA."""
        t = torch.tensor(values, dtype=dtype, pin_memory=self.cuda)
        return t.to(self.device, non_blocking=True)

    # ---- inputs --------------------------------------------------------------------------------
    def _admit(self, plan: StepPlan) -> None:
        if not plan.admit:
            return
        idx = self.to_device([a.slot for a in plan.admit])
        self.temperature[idx] = self.to_device([a.temperature for a in plan.admit], torch.float32)
        self.top_p[idx] = self.to_device([a.top_p for a in plan.admit], torch.float32)
        self.top_k[idx] = self.to_device([a.top_k for a in plan.admit])
        self.seed[idx] = self.to_device([fold_seed(a.seed) for a in plan.admit])
        for a in plan.admit:
            self.logprobs[a.slot] = a.logprobs
            self.prompt_logprobs[a.slot] = a.prompt_logprobs
            self.filtered[a.slot] = a.top_p < 1.0 or a.top_k > 0
            self.sampled[a.slot] = a.temperature > 0

    def _attention_batch(self, q_lens: list[int], kv_lens: list[int], page_indptr: list[int],
                         page_indices: list[int], num_prefill: int) -> AttentionBatch:
        q = torch.tensor(q_lens)
        kv = torch.tensor(kv_lens)
        qo_indptr = torch.zeros(len(q_lens) + 1, dtype=torch.int64)
        torch.cumsum(q, 0, out=qo_indptr[1:])
        offsets = torch.arange(int(qo_indptr[-1])) - qo_indptr[:-1].repeat_interleave(q)
        positions = (kv - q).repeat_interleave(q) + offsets
        dev = self.device
        return AttentionBatch(
            qo_indptr=qo_indptr.to(dev, torch.int32),
            page_indptr=self.to_device(page_indptr, torch.int32),
            page_indices=self.to_device(page_indices, torch.int32),
            last_page_len=((kv - 1) % self.page_size + 1).to(dev, torch.int32),
            kv_lens=kv.to(dev, torch.int32),
            positions=positions.pin_memory().to(dev, non_blocking=True) if self.cuda else positions,
            q_lens_host=q_lens,
            kv_lens_host=kv_lens,
            page_indptr_host=page_indptr,
            num_prefill=num_prefill,
        )

    def forward(self, plan: StepPlan) -> tuple[torch.Tensor, list[int]]:
        """Hidden states of every token of the plan, and qo_indptr (host) to find each row's."""
        n_dec = len(plan.slots) - plan.num_prefill
        if plan.num_prefill == 0 and self.graphs and n_dec <= max(self.graphs):
            return self._replay(plan)
        batch = self._attention_batch(plan.q_lens, plan.kv_lens, plan.page_indptr, plan.page_indices, plan.num_prefill)
        self.attn.plan(batch)
        decode_slots = self.to_device(plan.slots[plan.num_prefill :])
        ids = torch.cat([self.to_device(plan.prefill_tokens), self.last_token[decode_slots]])
        seq_lens = batch.kv_lens.long().repeat_interleave(torch.tensor(plan.q_lens, device=self.device))
        hidden = self.model(ids, ForwardContext(self.attn, batch.positions, seq_lens))
        return hidden, _indptr(plan.q_lens)

    # ---- CUDA graphs ---------------------------------------------------------------------------
    def capture_graphs(self, sizes: list[int]) -> None:
        """Captures the forward of decode-only steps of each batch size (padding rows use the
        scratch slot and page). Call once, after the KV cache exists and before serving."""
        max_bs = max(sizes)
        self.g_ids = torch.zeros(max_bs, dtype=torch.int64, device=self.device)
        self.g_pos = torch.zeros(max_bs, dtype=torch.int64, device=self.device)
        self.g_seq = torch.ones(max_bs, dtype=torch.int64, device=self.device)
        pool = torch.cuda.graph_pool_handle()
        for bs in sorted(sizes, reverse=True):
            self.attn.add_graph_size(bs, max_pages=bs * 64 + 4096)
            self._plan_graph(bs, [1] * bs, list(range(bs + 1)), [self.scratch_page] * bs)
            ctx = ForwardContext(self.attn, self.g_pos[:bs], self.g_seq[:bs])
            self.model(self.g_ids[:bs], ctx)  # warm-up outside the graph
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self.model(self.g_ids[:bs], ctx)
            self.graphs[bs] = (graph, out)
        torch.cuda.synchronize()

    def _plan_graph(self, bs: int, kv_lens: list[int], indptr: list[int], indices: list[int]) -> None:
        batch = self._attention_batch([1] * bs, kv_lens, indptr, indices, 0)
        self.g_pos[:bs].copy_(batch.positions)
        self.g_seq[:bs].copy_(batch.kv_lens)
        self.attn.plan(batch, graph_size=bs)

    def _replay(self, plan: StepPlan):
        n = len(plan.slots)
        bs = min(s for s in self.graphs if s >= n)
        pad = bs - n
        indptr = plan.page_indptr + [plan.page_indptr[-1] + i + 1 for i in range(pad)]
        self._plan_graph(bs, plan.kv_lens + [1] * pad, indptr, plan.page_indices + [self.scratch_page] * pad)
        slots = self.to_device(plan.slots + [self.scratch_slot] * pad)
        torch.index_select(self.last_token, 0, slots, out=self.g_ids[:bs])
        graph, out = self.graphs[bs]
        graph.replay()
        return out[:n], _indptr(plan.q_lens)

    # ---- step ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def launch(self, plan: StepPlan) -> Launched:
        self._admit(plan)
        hidden, qo_indptr = self.forward(plan)
        rows = [r for r, e in enumerate(plan.emit) if e]
        slots = [plan.slots[r] for r in rows]
        num_top = max([0] + [self.logprobs[s] for s in slots])
        packed = torch.empty(len(rows), 2 + 2 * num_top, dtype=torch.float32, device=self.device)
        for lo in range(0, len(rows), LOGIT_CHUNK):
            chunk = rows[lo : lo + LOGIT_CHUNK]
            packed[lo : lo + len(chunk)] = self._sample(plan, chunk, hidden, qo_indptr, num_top)
        host = torch.empty(packed.shape, dtype=torch.float32, pin_memory=self.cuda)
        host.copy_(packed, non_blocking=True)
        done = None
        if self.cuda:
            done = torch.cuda.Event()
            done.record()
        prompt = self._prompt_logprobs(plan, hidden, qo_indptr)
        return Launched(plan, rows, num_top, host, done, prompt)

    def finish(self, launched: Launched) -> StepResult:
        if launched.done is not None:
            launched.done.synchronize()
        plan, k = launched.plan, launched.num_top
        values = launched.packed.tolist()
        result = StepResult(plan.step_id, [plan.rids[r] for r in launched.rows],
                            [int(v[0]) for v in values], [v[1] for v in values], prompt=launched.prompt)
        for i, (r, v) in enumerate(zip(launched.rows, values)):
            want = self.logprobs[plan.slots[r]]
            if want > 0:
                result.top_rows.append(i)
                result.top.append(TopLogprobs([int(x) for x in v[2 : 2 + want]], v[2 + k : 2 + k + want]))
        return result

    def step(self, plan: StepPlan) -> StepResult:
        return self.finish(self.launch(plan))

    def _sample(self, plan, rows, hidden, qo_indptr, num_top) -> torch.Tensor:
        slots = [plan.slots[r] for r in rows]
        slot_t = self.to_device(slots)
        last = self.to_device([int(qo_indptr[r + 1]) - 1 for r in rows])
        batch = SamplingBatch(
            temperature=self.temperature[slot_t],
            top_p=self.top_p[slot_t],
            top_k=self.top_k[slot_t],
            seeds=self.seed[slot_t],
            positions=self.to_device([plan.kv_lens[r] for r in rows]),
            filtered=any(self.filtered[s] for s in slots),
            random=any(self.sampled[s] for s in slots),
            num_top=num_top,
        )
        tokens, chosen, top_ids, top_lp = sample(self.model.logits(hidden[last]), batch)
        self.last_token[slot_t] = tokens
        parts = [tokens.float()[:, None], chosen[:, None]]
        if num_top:
            parts += [top_ids.float(), top_lp]
        return torch.cat(parts, dim=1)

    def _prompt_logprobs(self, plan, hidden, qo_indptr) -> list[PromptLogprobs]:
        """For prefill rows that asked: the logprob of each prompt token given the ones before it.
        Rare (echo requests), so it may synchronize."""
        out = []
        wanting = [r for r in range(plan.num_prefill) if self.prompt_logprobs[plan.slots[r]] >= 0]
        for r, following in zip(wanting, plan.prefill_next):
            lo, hi = qo_indptr[r], qo_indptr[r + 1]  # prefill rows come first: their tokens are here
            targets = plan.prefill_tokens[lo + 1 : hi] + ([following] if following >= 0 else [])
            if not targets:
                continue
            k = self.prompt_logprobs[plan.slots[r]]
            chosen, top = [], []
            for c in range(0, len(targets), LOGIT_CHUNK):  # bounded like sampling's logits
                part = targets[c : c + LOGIT_CHUNK]
                logprobs = torch.log_softmax(self.model.logits(hidden[lo + c : lo + c + len(part)]), dim=-1)
                chosen += logprobs.gather(1, self.to_device(part)[:, None])[:, 0].clamp(min=MIN_LOGPROB).tolist()
                if k > 0:
                    top_lp, top_ids = logprobs.topk(k, dim=-1)
                    top += [TopLogprobs(i, p) for i, p in zip(top_ids.tolist(), top_lp.clamp(min=MIN_LOGPROB).tolist())]
            out.append(PromptLogprobs(plan.rids[r], plan.kv_lens[r] - plan.q_lens[r] + 1, chosen, top))
        return out


def _indptr(q_lens: list[int]) -> list[int]:
    out = [0]
    for n in q_lens:
        out.append(out[-1] + n)
    return out
