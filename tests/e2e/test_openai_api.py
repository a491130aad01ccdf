"""The API through the official `openai` client against a launched server."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import requests
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.helpers import TINY_NAME


@pytest.fixture(scope="module")
def client(tiny_server):
    return openai.OpenAI(base_url=tiny_server.url + "/v1", api_key="none", max_retries=0)


def greedy(client, prompt, max_tokens=16, **kw):
    return client.completions.create(model=TINY_NAME, prompt=prompt, max_tokens=max_tokens, temperature=0, **kw)


def test_default_model_answers_paris(default_server):
    """The README's first request, with the default sampling settings."""
    body = {"messages": [{"role": "user", "content": "What is the capital of France?"}]}
    resp = requests.post(default_server.url + "/v1/chat/completions", json=body, timeout=60)
    assert resp.status_code == 200
    assert "Paris" in resp.json()["choices"][0]["message"]["content"]


def test_models(client, tiny_server):
    models = client.models.list().data
    assert [m.id for m in models] == [TINY_NAME]


def test_completion_prompt_forms(client, tiny_models):
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["tiny-llama"])
    text = "the cat sat on the mat"
    ids = tokenizer(text).input_ids
    by_text = greedy(client, text).choices[0].text
    assert greedy(client, ids).choices[0].text == by_text
    many = greedy(client, [text, "another prompt"])
    assert [c.index for c in many.choices] == [0, 1] and many.choices[0].text == by_text
    batch = greedy(client, [ids, ids])
    assert batch.choices[0].text == batch.choices[1].text == by_text
    assert batch.usage.prompt_tokens == 2 * len(ids)


def test_greedy_matches_transformers_generate(client, tiny_models):
    path = tiny_models["tiny-llama"]
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = tokenizer("once upon a time").input_ids
    out = model.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False, eos_token_id=None,
                         pad_token_id=0)[0, len(ids):].tolist()
    resp = greedy(client, ids, max_tokens=20, logprobs=0, extra_body={"ignore_eos": True})
    tokens = tokenizer.convert_tokens_to_ids(resp.choices[0].logprobs.tokens)
    assert tokens == out
    assert resp.choices[0].finish_reason == "length" and resp.usage.completion_tokens == 20


def test_sampling_with_seed_is_reproducible_and_n_gives_distinct_choices(client):
    kw = dict(model=TINY_NAME, prompt="hello world", max_tokens=24, temperature=1.0, seed=1234, n=4)
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    texts = [c.text for c in a.choices]
    assert texts == [c.text for c in b.choices]
    assert len(set(texts)) > 1
    c = client.completions.create(**{**kw, "seed": 99})
    assert [x.text for x in c.choices] != texts


def test_top_k_1_is_greedy(client):
    kw = dict(model=TINY_NAME, prompt="some text", max_tokens=16)
    sampled = client.completions.create(**kw, temperature=1.5, seed=7, extra_body={"top_k": 1})
    assert sampled.choices[0].text == greedy(client, "some text").choices[0].text


def test_streaming_equals_non_streaming(client):
    full = greedy(client, "stream me", max_tokens=30)
    chunks = list(greedy(client, "stream me", max_tokens=30, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]


def test_chat_streaming(client):
    kw = dict(model=TINY_NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=20, temperature=0)
    full = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(**kw, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full


def test_stop_string(client):
    full = greedy(client, "a b c", max_tokens=40, extra_body={"ignore_eos": True}).choices[0].text
    assert len(full) > 6
    stop = full[4:6]
    first = full.index(stop)
    for stream in (False, True):
        resp = greedy(client, "a b c", max_tokens=40, stop=[stop], stream=stream, extra_body={"ignore_eos": True})
        if stream:
            parts = list(resp)
            text = "".join(c.choices[0].text for c in parts)
            reason = parts[-1].choices[0].finish_reason
        else:
            text, reason = resp.choices[0].text, resp.choices[0].finish_reason
        assert text == full[:first] and reason == "stop"


def test_completion_logprobs(client):
    resp = greedy(client, "logprobs please", max_tokens=10, logprobs=3)
    lp = resp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 10
    for token, chosen, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 3 and top[token] == pytest.approx(chosen) and chosen == max(top.values())


def test_echo_prompt_logprobs_match_transformers(client, tiny_models):
    """What lm-eval-harness asks for a loglikelihood: echo, logprobs, no new tokens."""
    path = tiny_models["tiny-llama"]
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer("the meaning of life is forty two").input_ids
    resp = client.completions.create(model=TINY_NAME, prompt=ids, max_tokens=0, echo=True, logprobs=1, temperature=0)
    lp = resp.choices[0].logprobs
    assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(ids)
    assert resp.choices[0].text == tokenizer.decode(ids)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1)[:-1].gather(1, torch.tensor(ids[1:])[:, None])
    assert torch.allclose(torch.tensor(lp.token_logprobs[1:]), ref[:, 0], atol=1e-3)


def test_concurrent_requests_match_sequential(client):
    prompts = [f"request number {i} says" for i in range(32)]
    alone = [greedy(client, p, max_tokens=24).choices[0].text for p in prompts]
    with ThreadPoolExecutor(32) as pool:
        together = list(pool.map(lambda p: greedy(client, p, max_tokens=24).choices[0].text, prompts))
    assert together == alone


def test_bad_request_then_good_request(client, tiny_server):
    resp = requests.post(tiny_server.url + "/v1/completions", json={"prompt": "x", "temperature": -1})
    assert resp.status_code == 400
    err = resp.json()["error"]
    assert err["param"] == "temperature" and err["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=TINY_NAME, prompt=[10**9], max_tokens=4)
    assert greedy(client, "still fine").choices[0].text is not None


def test_return_tokens_as_token_ids(client, tiny_models):
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["tiny-llama"])
    resp = greedy(client, "ids please", max_tokens=6, logprobs=2, extra_body={"return_tokens_as_token_ids": True})
    lp = resp.choices[0].logprobs
    ids = [int(t.removeprefix("token_id:")) for t in lp.tokens]
    assert all(t.startswith("token_id:") for t in lp.tokens) and len(ids) == 6
    assert tokenizer.decode(ids) == resp.choices[0].text
    assert all(f"token_id:{i}" in top for i, top in zip(ids, lp.top_logprobs))


def test_the_readme_python_example_runs(default_server):
    """The README's first Python block, as written, against a server of the embedded model (the batch
    one runs in test_batches.py)."""
    import re
    from pathlib import Path

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    code = re.findall(r"```python\n(.*?)```", readme, re.S)[0]
    assert "http://localhost:10210/v1" in code
    exec(compile(code.replace("http://localhost:10210/v1", default_server.url + "/v1"), "README.md", "exec"), {})
