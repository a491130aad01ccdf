"""The model code itself against transformers in float32, in process (no server): every prompt
position's logprob, for every architecture and rope scaling variant, whole or chunked prefill."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.conftest import TINY_SHAPES
from tests.helpers import local_runner, prefill_plan
from toka.protocol import StepPlan

ROPE_VARIANTS = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 4.0},
}


def hf_prompt_logprobs(path, prompt):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([prompt])).logits[0], -1)
    return lp[:-1].gather(1, torch.tensor(prompt[1:])[:, None])[:, 0]


def with_rope(src, dst, rope):
    """A copy of model folder src whose config uses another rope scaling, with a short original
    window so that dynamic scaling takes effect within the test's prompt."""
    import shutil

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    params = {"rope_theta": 10000.0, **rope}
    if rope["rope_type"] == "dynamic":
        cfg["max_position_embeddings"] = 24  # the 40-token prompt runs past it
        params["original_max_position_embeddings"] = 24
    cfg.pop("rope_scaling", None)
    cfg["rope_parameters"] = params
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("shape", TINY_SHAPES + list(ROPE_VARIANTS))
def test_prompt_logprobs_match_transformers(tiny_models, tmp_path, shape):
    from pathlib import Path

    if shape in ROPE_VARIANTS:
        path = with_rope(Path(tiny_models["tiny-llama"]), tmp_path / shape, ROPE_VARIANTS[shape])
    else:
        path = Path(tiny_models[shape])
    prompt = [(37 * i + 11) % 500 for i in range(40)]
    runner = local_runner(str(path), max_model_len=len(prompt))  # dynamic rope: past the model's window
    ours = torch.tensor(runner.step(prefill_plan(0, [prompt], 16, prompt_logprobs=0)).prompt[0].logprobs)
    ref = hf_prompt_logprobs(str(path), prompt)
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() <= 1e-3


def test_chunked_prefill_equals_whole_prefill(tiny_models):
    prompt = [(13 * i + 5) % 500 for i in range(45)]
    whole = local_runner(tiny_models["tiny-qwen3"]).step(prefill_plan(0, [prompt], 16, prompt_logprobs=0))
    runner = local_runner(tiny_models["tiny-qwen3"])
    first = prefill_plan(0, [prompt[:20]], 16, prompt_logprobs=0)
    first.emit, first.prefill_next = [False], [prompt[20]]
    got = runner.step(first).prompt[0].logprobs
    second = StepPlan(1, [0], [0], [25], [45], [True], 1, prompt[20:], [0], [2], [2], prefill_next=[-1])  # + page 2
    result = runner.step(second)
    got += result.prompt[0].logprobs
    assert result.tokens == whole.tokens
    assert torch.allclose(torch.tensor(got), torch.tensor(whole.prompt[0].logprobs), atol=1e-4)
