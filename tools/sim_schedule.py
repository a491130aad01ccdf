"""Replays a sharegpt-like workload through the scheduler alone (results one step late, as the ranks
return them) and costs each planned step with a linear model of a served step, to see what the run
as a whole should take given the plans the scheduler makes. The default costs come from a traced
steady step on an H200 (docs/performance.md, 2026-12-02: 24.64 ms, of which the Triton decode
kernel's 7.73 ms for 854 k cached tokens read by decode rows, the rest 16.91 ms for 4,154 tokens),
and the KV cache from the H200's served size (3,825,168 tokens).

    python tools/sim_schedule.py --requests 16384            # the quick run
    python tools/sim_schedule.py --requests 16384 --order longest-output-first
"""

from __future__ import annotations

import argparse

import numpy as np

from toka.protocol import SamplingParams, StepResult
from toka.scheduler.batching import Scheduler


def simulate(requests: int, order: str, kv_tokens: int, max_seqs: int, ms_per_token: float,
             ms_per_cached_token: float, ms_per_step: float, page_size: int = 16) -> dict:
    rng = np.random.default_rng(0)
    prompt_len, output_len = rng.integers(1, 513, requests), rng.integers(1, 513, requests)
    admitted = np.argsort(-output_len, kind="stable") if order == "longest-output-first" else np.arange(requests)
    s = Scheduler(num_pages=kv_tokens // page_size, page_size=page_size, max_seqs=max_seqs,
                  max_tokens_per_forward=8192)
    for i in admitted:  # random token ids: prompts must not share prefixes by accident
        s.add(int(i), rng.integers(0, 128000, int(prompt_len[i])).tolist(),
              SamplingParams(max_tokens=int(output_len[i]), temperature=0.0))
    seconds, rows, pending = 0.0, [], []
    while not s.idle:
        plan = s.schedule()
        if plan is not None:
            cached = sum(plan.kv_lens[plan.num_prefill :])
            seconds += (ms_per_step + ms_per_token * sum(plan.q_lens) + ms_per_cached_token * cached) / 1e3
            rows.append(len(plan.slots) - plan.num_prefill)
            emitting = [rid for rid, e in zip(plan.rids, plan.emit) if e]
            pending.append(StepResult(plan.step_id, emitting, [0] * len(emitting), [0.0] * len(emitting)))
        if len(pending) > 1 or (plan is None and pending):
            s.update(pending.pop(0))
    tokens = int(prompt_len.sum() + output_len.sum())
    return dict(order=order, steps=len(rows), seconds=seconds, total_tok_s=tokens / seconds,
                steps_below_1900_rows=int((np.asarray(rows) < 1900).sum()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=16384)
    p.add_argument("--order", choices=["arrival", "longest-output-first"], default="arrival")
    p.add_argument("--kv-tokens", type=int, default=3825168)
    p.add_argument("--max-seqs", type=int, default=2048)
    p.add_argument("--ms-per-token", type=float, default=16.91 / 4154)
    p.add_argument("--ms-per-cached-token", type=float, default=7.73 / 853713)
    p.add_argument("--ms-per-step", type=float, default=0.0)
    args = p.parse_args()
    r = simulate(args.requests, args.order, args.kv_tokens, args.max_seqs, args.ms_per_token,
                 args.ms_per_cached_token, args.ms_per_step)
    print(f"{r['order']}: {args.requests} requests, {r['steps']} steps ({r['steps_below_1900_rows']} below 1,900 "
          f"decode rows), modelled {r['seconds']:.1f} s = {r['total_tok_s'] / 1e3:.1f} k total tok/s")


if __name__ == "__main__":
    main()
