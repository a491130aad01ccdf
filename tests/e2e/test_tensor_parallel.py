"""--tp N on the CPU (gloo): the same greedy tokens as --tp 1 and logprobs within 1e-4 (float32)."""

from __future__ import annotations

import openai
import pytest

from tests.helpers import Server

PROMPTS = ["tensor parallel check", "a b c d e f g", "the quick brown fox " * 5]


def outputs(server: Server) -> list[tuple[list[str], list[float]]]:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    model = client.models.list().data[0].id
    out = []
    for prompt in PROMPTS:
        resp = client.completions.create(model=model, prompt=prompt, max_tokens=24, temperature=0, logprobs=2,
                                         extra_body={"ignore_eos": True})
        lp = resp.choices[0].logprobs
        out.append((lp.tokens, lp.token_logprobs))
    return out


@pytest.mark.parametrize("shape,tp", [("tiny-llama", 2), ("tiny-qwen3", 2)])
def test_tp_matches_single_rank(tiny_models, shape, tp):
    results = {}
    for n in (1, tp):
        server = Server("--model", tiny_models[shape], "--tp", str(n), "--max-seqs", "8")
        try:
            results[n] = outputs(server)
        finally:
            assert server.stop() == 0
    for (tokens1, lps1), (tokens_n, lps_n) in zip(results[1], results[tp]):
        assert tokens_n == tokens1
        assert max(abs(a - b) for a, b in zip(lps1, lps_n)) <= 1e-4
