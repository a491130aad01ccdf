"""tools/bench_step.py's step plans: rows in Hydragen groups read their group's shared pages, and a
grouped step decodes as the same pages do without groups; its sustained run of steps."""

from __future__ import annotations

import msgspec
import pytest

from tests.helpers import local_runner
from toka.protocol import SeqParams, StepPlan
from tools.bench_step import step_plan, sustain

PLAN = dict(batch=40, context=5, page_size=16, groups=2, shared=32)  # 20 rows a group, 2 shared pages


def tables(plan: StepPlan) -> dict[int, list[int]]:
    out: dict[int, dict[int, int]] = {}
    for slot, col, page in zip(plan.table_slots, plan.table_cols, plan.table_pages):
        out.setdefault(slot, {})[col] = page
    return {slot: [cols[c] for c in sorted(cols)] for slot, cols in out.items()}


def test_group_rows_share_their_groups_pages_and_own_the_rest():
    plan = step_plan(0, **PLAN)
    assert plan.group_rows == [20, 20] and plan.group_pages == [2, 2]
    assert plan.kv_lens == [37] * 40
    t = tables(plan)
    assert t[0][:2] == t[19][:2] != t[20][:2] == t[39][:2]
    own = [t[r][2] for r in range(40)]
    assert len(set(own)) == 40 and not set(own) & {p for r in (0, 20) for p in t[r][:2]}
    assert step_plan(1, **PLAN).table_pages == []  # later steps write no pages
    with pytest.raises(ValueError, match="whole pages"):
        step_plan(0, **{**PLAN, "shared": 20})
    with pytest.raises(ValueError, match="every group needs a row"):
        step_plan(0, **{**PLAN, "batch": 1})


def test_scattered_pages_are_the_packed_ones_moved_through_the_map():
    import random

    packed = step_plan(0, **PLAN)
    page_map = random.Random(0).sample(range(10_000), 80)  # 40 rows x 1 own page + 2 groups x 2 shared
    scattered = step_plan(0, **PLAN, page_map=page_map)
    assert scattered.table_pages == [page_map[p] for p in packed.table_pages]
    assert (scattered.table_slots, scattered.table_cols) == (packed.table_slots, packed.table_cols)


def test_grouped_steps_decode_as_the_same_pages_without_groups(tiny_models):
    results = {}
    for name in ("grouped", "plain"):
        runner = local_runner(tiny_models["tiny-llama"], max_seqs=40)
        runner._admit(StepPlan(-1, [], [], [], [], [], 0, [], [], [], [],
                               admit=[SeqParams(slot=s, temperature=0.0) for s in range(40)]))
        out = []
        for i in range(3):
            plan = step_plan(i, **PLAN)
            if name == "plain":
                plan = msgspec.structs.replace(plan, group_rows=[], group_pages=[])
            out.append(runner.step(plan))
        results[name] = out
    for grouped, plain in zip(results["grouped"], results["plain"]):
        assert grouped.tokens == plain.tokens
        assert grouped.logprobs == pytest.approx(plain.logprobs, abs=1e-4)


def test_a_sustained_run_times_its_first_and_last_tenth(tiny_models, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi: no card figures
    runner = local_runner(tiny_models["tiny-llama"], max_seqs=40)
    runner.step(step_plan(0, **PLAN))  # enters the page tables
    r = sustain(runner, lambda i: step_plan(i, **PLAN), seconds=0.2)
    assert r["steps"] >= 20 and r["first_ms"] > 0 and r["last_ms"] > 0 and r["card"] is None
