"""The prefix cache through the API: a repeated prompt is served from cached pages, reports them in
usage, and gives the same tokens and logprobs as when it was computed (float32 on CPU)."""

from __future__ import annotations

import time

import openai
import pytest
import requests

from tests.helpers import TINY_NAME


def metric(server, name: str) -> float:
    """A /metrics value once the scheduler's stats (sent every half second) caught up."""
    time.sleep(1.2)
    for line in requests.get(server.url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


@pytest.fixture(scope="module")
def client(tiny_server):
    return openai.OpenAI(base_url=tiny_server.url + "/v1", api_key="none", max_retries=0)


def test_repeated_prompt_is_cached_and_gives_the_same_output(client):
    prompt = [(31 * i + 7) % 400 + 20 for i in range(150)]  # tokens, so the page count is known
    kw = dict(model=TINY_NAME, prompt=prompt, max_tokens=12, temperature=0, logprobs=2)
    first = client.completions.create(**kw)
    again = client.completions.create(**kw)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert again.usage.prompt_tokens_details.cached_tokens == 144  # 9 full pages of 16; the rest computed
    a, b = first.choices[0], again.choices[0]
    assert a.text == b.text
    assert b.logprobs.token_logprobs == pytest.approx(a.logprobs.token_logprobs, abs=1e-4)
    for x, y in zip(a.logprobs.top_logprobs, b.logprobs.top_logprobs):
        assert x.keys() == y.keys() and list(y.values()) == pytest.approx(list(x.values()), abs=1e-4)


def test_n_choices_share_their_prompt(client):
    """n = 4 sampled choices of a new prompt: one prefill serves them all, seeds as without sharing."""
    prompt = [(17 * i + 3) % 400 + 20 for i in range(100)]
    many = client.completions.create(model=TINY_NAME, prompt=prompt, max_tokens=8, temperature=1.0, n=4, seed=5)
    assert many.usage.prompt_tokens == 100 and many.usage.prompt_tokens_details.cached_tokens == 0
    assert len({c.text for c in many.choices}) > 1
    again = client.completions.create(model=TINY_NAME, prompt=prompt, max_tokens=8, temperature=1.0, n=4, seed=5)
    assert [c.text for c in again.choices] == [c.text for c in many.choices]  # cached or not, same draws
    assert again.usage.prompt_tokens_details.cached_tokens == 96


def test_choices_of_a_prompt_of_whole_pages_copy_its_last_page(client):
    """A prompt of 8 full pages, n = 4 greedy: the first choice computes every page; the others find
    all 8 cached, copy the last into a page of their own and recompute only the last token there, so
    each gives the first's tokens and logprobs (a wrong copy would change what the last token sees)."""
    prompt = [(29 * i + 11) % 400 + 20 for i in range(128)]
    out = client.completions.create(model=TINY_NAME, prompt=prompt, max_tokens=6, temperature=0, n=4, logprobs=1)
    first = out.choices[0]
    for c in out.choices[1:]:
        assert c.text == first.text
        assert c.logprobs.token_logprobs == pytest.approx(first.logprobs.token_logprobs, abs=1e-4)


def test_hydragen_gives_what_plain_attention_gives(tiny_models, client):
    """n = 8 greedy-and-sampled choices of one long prompt, with Hydragen grouping every decode step
    (groups of >= 2 rows sharing >= 1 page), against the shared server without Hydragen."""
    from tests.helpers import Server

    prompt = [(23 * i + 5) % 400 + 20 for i in range(120)]
    kw = dict(model=TINY_NAME, prompt=prompt, max_tokens=10, n=8, seed=3, logprobs=1)
    server = Server("--model", tiny_models["tiny-llama"], "--served-model-name", TINY_NAME, "--kv-cache-tokens",
                    "16384", "--max-seqs", "64", "--hydragen", "--hydragen-min-group", "2", "--hydragen-min-prefix", "16")
    try:
        hydra = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        for temperature in (0.0, 1.0):
            want = client.completions.create(temperature=temperature, **kw)
            got = hydra.completions.create(temperature=temperature, **kw)
            assert [c.text for c in got.choices] == [c.text for c in want.choices]
            for a, b in zip(want.choices, got.choices):
                assert b.logprobs.token_logprobs == pytest.approx(a.logprobs.token_logprobs, abs=1e-4)
        assert metric(server, "toka_grouped_rows_total") > 0, "no step ran Hydragen groups"
    finally:
        assert server.stop() == 0
