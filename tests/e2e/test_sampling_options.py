"""vLLM's sampling options and the logprobs modes through the API: each option changes what the
engine generates as its meaning says, and logprobs are the model's own unless the server reports
the processed distribution."""

from __future__ import annotations

import openai
import pytest

from tests.helpers import TINY_NAME, Server

PROMPT = [(29 * i + 7) % 400 for i in range(21)]


@pytest.fixture(scope="module")
def client(tiny_server):
    return openai.OpenAI(base_url=tiny_server.url + "/v1", api_key="none", max_retries=0)


def ids_of(choice) -> list[int]:
    return [int(t.removeprefix("token_id:")) for t in choice.logprobs.tokens]


def complete(client, max_tokens=16, **extra):
    """Greedy unless extra says otherwise; token ids and logprobs come back."""
    kw = dict(temperature=0.0, logprobs=0)
    kw.update({k: extra.pop(k) for k in ("temperature", "top_p", "seed", "logprobs") if k in extra})
    resp = client.completions.create(model=TINY_NAME, prompt=PROMPT, max_tokens=max_tokens, **kw,
                                     extra_body=dict(return_tokens_as_token_ids=True, **extra))
    return resp.choices[0]


def test_repetition_penalty_changes_the_output(client):
    plain = ids_of(complete(client, 24))
    penalized = ids_of(complete(client, 24, repetition_penalty=1.5))
    assert plain != penalized
    assert ids_of(complete(client, 24, repetition_penalty=1.0)) == plain


def test_frequency_penalty_stops_repeats(client):
    out = ids_of(complete(client, 40, frequency_penalty=2.0))
    plain = ids_of(complete(client, 40))
    assert len(set(plain)) < len(plain), "greedy decoding of this model repeats itself"
    assert len(set(out)) > len(set(plain))


def test_logit_bias_forces_a_token(client):
    assert ids_of(complete(client, 8, logit_bias={"123": 100})) == [123] * 8


def test_min_tokens_holds_back_stop_tokens(client):
    first = ids_of(complete(client, 1))[0]
    stopped = complete(client, 8, stop_token_ids=[first])
    assert stopped.finish_reason == "stop" and ids_of(stopped) == []
    held = complete(client, 8, stop_token_ids=[first], min_tokens=3, logit_bias={str(first): 100})
    assert ids_of(held) == ids_of(complete(client, 3, logit_bias={str(first): -100}))  # then it stops
    assert held.finish_reason == "stop"


def test_min_p_one_is_greedy(client):
    greedy = complete(client, 12)
    sampled = complete(client, 12, temperature=1.0, seed=3, min_p=1.0)
    assert ids_of(sampled) == ids_of(greedy)


def test_logprobs_are_the_models_own_at_any_temperature(client):
    """top_p tiny keeps only the most likely token: the text is greedy's, and so are the logprobs
    (the processed distribution would give every token logprob 0)."""
    greedy = complete(client, 12)
    nucleus = complete(client, 12, temperature=0.7, top_p=1e-6, seed=1)
    assert ids_of(nucleus) == ids_of(greedy)
    assert nucleus.logprobs.token_logprobs == pytest.approx(greedy.logprobs.token_logprobs, abs=1e-4)
    assert min(nucleus.logprobs.token_logprobs) < -0.01


def test_processed_mode_reports_the_sampled_distribution(tiny_models):
    server = Server("--model", tiny_models["tiny-llama"], "--served-model-name", TINY_NAME, "--kv-cache-tokens",
                    "4096", "--max-seqs", "8", "--logprobs-mode", "processed")
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        nucleus = complete(client, 12, temperature=0.7, top_p=1e-6, seed=1)
        assert nucleus.logprobs.token_logprobs == [0.0] * 12  # one token kept: probability 1
        tempered = complete(client, 12, temperature=0.5, seed=1, logprobs=2)
        for lp, top in zip(tempered.logprobs.token_logprobs, tempered.logprobs.top_logprobs):
            assert lp <= max(top.values()) + 1e-6
    finally:
        assert server.stop() == 0
