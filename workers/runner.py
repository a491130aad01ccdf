"""One rank's step: plan -> input tensors -> forward -> logits of emitting rows -> sampling -> result.

The rank keeps per-slot state on its device: the last sampled token (decode rows read their input
there, so the scheduler never needs to know it before planning the next step) and the sampling
settings sent once when a sequence takes its slot.
"""

from __future__ import annotations

import torch

from toka.protocol import PromptLogprobs, StepPlan, StepResult, TopLogprobs
from workers.attention import AttentionBackend, AttentionBatch
from workers.layers.attention import ForwardContext
from workers.sampling import SamplingBatch, fold_seed, sample

# Rows of logits materialized at once: bounds the float32 [rows, vocab] buffers of large batches.
LOGIT_CHUNK = 512


class ModelRunner:
    def __init__(self, model, attn: AttentionBackend, max_seqs: int, page_size: int, device: torch.device):
        self.model = model
        self.attn = attn
        self.page_size = page_size
        self.device = device
        i64, f32 = dict(dtype=torch.int64, device=device), dict(dtype=torch.float32, device=device)
        self.last_token = torch.zeros(max_seqs, **i64)
        self.temperature = torch.zeros(max_seqs, **f32)
        self.top_p = torch.ones(max_seqs, **f32)
        self.top_k = torch.zeros(max_seqs, **i64)
        self.seed = torch.zeros(max_seqs, **i64)
        # host mirrors of what decides tensor shapes, so planning never reads the device
        self.logprobs = [-1] * max_seqs
        self.prompt_logprobs = [-1] * max_seqs
        self.filtered = [False] * max_seqs

    # ---- inputs --------------------------------------------------------------------------------
    def _admit(self, plan: StepPlan) -> None:
        if not plan.admit:
            return
        slots = [a.slot for a in plan.admit]
        idx = torch.tensor(slots, device=self.device)
        self.temperature[idx] = torch.tensor([a.temperature for a in plan.admit], device=self.device)
        self.top_p[idx] = torch.tensor([a.top_p for a in plan.admit], device=self.device)
        self.top_k[idx] = torch.tensor([a.top_k for a in plan.admit], device=self.device)
        self.seed[idx] = torch.tensor([fold_seed(a.seed) for a in plan.admit], device=self.device)
        for a in plan.admit:
            self.logprobs[a.slot] = a.logprobs
            self.prompt_logprobs[a.slot] = a.prompt_logprobs
            self.filtered[a.slot] = a.top_p < 1.0 or a.top_k > 0

    def _batch(self, plan: StepPlan) -> tuple[torch.Tensor, ForwardContext, torch.Tensor]:
        dev = self.device
        q_lens = torch.tensor(plan.q_lens)
        kv_lens = torch.tensor(plan.kv_lens)
        starts = kv_lens - q_lens
        qo_indptr = torch.zeros(len(plan.q_lens) + 1, dtype=torch.int64)
        torch.cumsum(q_lens, 0, out=qo_indptr[1:])
        offsets = torch.arange(int(qo_indptr[-1])) - qo_indptr[:-1].repeat_interleave(q_lens)
        positions = starts.repeat_interleave(q_lens) + offsets
        batch = AttentionBatch(
            qo_indptr=qo_indptr.to(dev, torch.int32),
            page_indptr=torch.tensor(plan.page_indptr, dtype=torch.int32, device=dev),
            page_indices=torch.tensor(plan.page_indices, dtype=torch.int32, device=dev),
            last_page_len=((kv_lens - 1) % self.page_size + 1).to(dev, torch.int32),
            kv_lens=kv_lens.to(dev, torch.int32),
            positions=positions.to(dev),
            q_lens_host=plan.q_lens,
            kv_lens_host=plan.kv_lens,
            page_indptr_host=plan.page_indptr,
            num_prefill=plan.num_prefill,
        )
        self.attn.plan(batch)
        decode_slots = torch.tensor(plan.slots[plan.num_prefill :], device=dev, dtype=torch.int64)
        ids = torch.cat([torch.tensor(plan.prefill_tokens, dtype=torch.int64, device=dev), self.last_token[decode_slots]])
        ctx = ForwardContext(attn=self.attn, positions=batch.positions, seq_lens=kv_lens.repeat_interleave(q_lens).to(dev))
        return ids, ctx, qo_indptr

    # ---- step ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self, plan: StepPlan) -> StepResult:
        self._admit(plan)
        ids, ctx, qo_indptr = self._batch(plan)
        hidden = self.model(ids, ctx)
        rows = [r for r, e in enumerate(plan.emit) if e]
        result = StepResult(plan.step_id, [plan.rids[r] for r in rows], [], [])
        for lo in range(0, len(rows), LOGIT_CHUNK):
            self._sample_rows(plan, rows[lo : lo + LOGIT_CHUNK], hidden, qo_indptr, result)
        result.prompt = self._prompt_logprobs(plan, hidden, ids, qo_indptr)
        return result

    def _sample_rows(self, plan, rows, hidden, qo_indptr, result: StepResult) -> None:
        slots = [plan.slots[r] for r in rows]
        slot_t = torch.tensor(slots, device=self.device)
        logits = self.model.logits(hidden[(qo_indptr[1:][rows] - 1).to(self.device)])
        batch = SamplingBatch(
            temperature=self.temperature[slot_t],
            top_p=self.top_p[slot_t],
            top_k=self.top_k[slot_t],
            seeds=self.seed[slot_t],
            positions=torch.tensor([plan.kv_lens[r] for r in rows], device=self.device),
            filtered=any(self.filtered[s] for s in slots),
            num_top=max(self.logprobs[s] for s in slots),
        )
        tokens, chosen, top_ids, top_lp = sample(logits, batch)
        self.last_token[slot_t] = tokens
        base = len(result.tokens)
        result.tokens += tokens.tolist()
        result.logprobs += chosen.tolist()
        if top_ids is not None:
            ids_l, lps_l = top_ids.tolist(), top_lp.tolist()
            for i, s in enumerate(slots):
                if self.logprobs[s] > 0:
                    k = self.logprobs[s]
                    result.top_rows.append(base + i)
                    result.top.append(TopLogprobs(ids_l[i][:k], lps_l[i][:k]))

    def _prompt_logprobs(self, plan, hidden, ids, qo_indptr) -> list[PromptLogprobs]:
        """For prefill rows that asked: the logprob of each prompt token given the ones before it."""
        out = []
        wanting = [r for r in range(plan.num_prefill) if self.prompt_logprobs[plan.slots[r]] >= 0]
        for r, following in zip(wanting, plan.prefill_next):
            lo, hi = int(qo_indptr[r]), int(qo_indptr[r + 1])
            targets = ids[lo + 1 : hi]
            if following >= 0:
                targets = torch.cat([targets, torch.tensor([following], device=self.device)])
            if targets.numel() == 0:
                continue
            logprobs = torch.log_softmax(self.model.logits(hidden[lo : lo + targets.numel()]), dim=-1)
            chosen = logprobs.gather(1, targets[:, None])[:, 0].tolist()
            k = self.prompt_logprobs[plan.slots[r]]
            top = []
            if k > 0:
                top_lp, top_ids = logprobs.topk(k, dim=-1)
                top = [TopLogprobs(i, p) for i, p in zip(top_ids.tolist(), top_lp.tolist())]
            start = plan.kv_lens[r] - plan.q_lens[r] + 1
            out.append(PromptLogprobs(plan.rids[r], start, chosen, top))
        return out
