"""--pp 2 on the CPU (gloo): two stages of one layer each give the outputs of one process, through
preemption and prefix-cache hits, and combine with --dp."""

from __future__ import annotations

import pytest
import requests

from tests.reliability.conftest import assert_same_outcomes, child_pids, mixed, settled, start

# a small cache, so that the mix below preempts; both servers of a comparison run the same flags
CRAMPED = ("--kv-cache-tokens", "1024")
PREFIX = "a prefix the later requests of the mix find in the cache: " + "shared words " * 20


def workload() -> list[dict]:
    """32 mixed requests (greedy and seeded sampling, n of 1 and 3, streamed or not, logprobs) and
    8 that share a prefix of several pages."""
    shared = [{"prompt": PREFIX + f"then {i}", "max_tokens": 12, "logprobs": 1, "temperature": 0.0,
               "return_tokens_as_token_ids": True, "stream": False} for i in range(8)]
    return [mixed(i) for i in range(32)] + shared


@pytest.mark.parametrize("shape", ["tiny-llama", "tiny-qwen3"])
def test_two_stages_answer_as_one(tiny_models, shape):
    one = start(tiny_models[shape], *CRAMPED)
    two = start(tiny_models[shape], *CRAMPED, "--pp", "2")
    try:
        assert set(child_pids(two)) == {"rank0", "rank1", "scheduler"}
        out = two.output()
        assert "stage 0 of 2: layers 0-0" in out and "stage 1 of 2: layers 1-1" in out
        assert_same_outcomes(two.url, one.url, workload())
        m = settled(two.url)
        assert m["preemptions_total"] > 0, m
        assert m["prefix_hit_tokens_total"] > 0, m
    finally:
        assert two.stop() == 0, two.output()
        one.stop()


def test_pipeline_stages_in_each_replica(tiny_models, shared):
    """--dp 2 x --pp 2: four rank processes on the two CPU cores, both replicas serving."""
    server = start(tiny_models["tiny-llama"], "--dp", "2", "--pp", "2")
    try:
        assert set(child_pids(server)) == {f"replica{k}.{role}" for k in (0, 1)
                                           for role in ("rank0", "rank1", "scheduler")}
        assert requests.get(server.url + "/health", timeout=5).json() == {"status": "ok", "replicas": 2}
        assert_same_outcomes(server.url, shared.url, [mixed(i) for i in range(8)])
        m = settled(server.url)
        assert m['steps_total{replica="0"}'] > 0 and m['steps_total{replica="1"}'] > 0, m
    finally:
        assert server.stop() == 0, server.output()


def test_tensor_parallel_ranks_in_each_stage(tiny_models, shared):
    """--pp 2 x --tp 2: each stage's two ranks all-reduce in their own group."""
    server = start(tiny_models["tiny-llama"], "--pp", "2", "--tp", "2")
    try:
        assert set(child_pids(server)) == {"rank0", "rank1", "rank2", "rank3", "scheduler"}
        assert_same_outcomes(server.url, shared.url, [mixed(i) for i in range(8)])
    finally:
        assert server.stop() == 0, server.output()
