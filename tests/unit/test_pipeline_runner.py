"""Pipeline stages in one process (queues for links): the stages of tiny Llama and Qwen3 run two
sequences in interleaved micro-batches, the first stage ahead of the tokens coming back, and give
what the whole model gives for the same plans."""

from __future__ import annotations

import pytest

from tests.helpers import interleaved_plans, local_pipeline, local_runner, run_pipelined


@pytest.mark.parametrize("shape", ["tiny-llama", "tiny-qwen3"])
def test_stages_give_the_whole_models_tokens(tiny_models, shape):
    whole = local_runner(tiny_models[shape], kv_tokens=512)
    stages = local_pipeline(tiny_models[shape], 2, kv_tokens=512)
    assert [s.model.stage.layers for s in stages] == [range(0, 1), range(1, 2)]
    plans = interleaved_plans(whole.page_size, 24)
    ours = run_pipelined(stages, plans)
    theirs = [whole.step(p) for p in plans]
    assert [r.step_id for r in ours] == list(range(24))
    assert [r.tokens for r in ours] == [r.tokens for r in theirs]
    for a, b in zip(ours, theirs):
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) <= 1e-5
        assert [t.ids for t in a.top] == [t.ids for t in b.top]
