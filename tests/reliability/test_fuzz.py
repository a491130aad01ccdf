"""Fuzzing the HTTP API: thousands of generated bodies, valid and invalid, of every field type and
range, on both generation endpoints. The server must never answer with a 5xx (or an error event in
a stream), every 400 must carry an OpenAI error body, and afterwards it must still be healthy and
give the same greedy output as before. A `model` it does not serve is the one 4xx other than 400."""

from __future__ import annotations

import json

import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.reliability.conftest import wait_idle

EXAMPLES = 2100
VOCAB = 512

# ---- values ------------------------------------------------------------------------------------
scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=20)
any_json = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                        max_leaves=12)
text = st.text(max_size=40) | st.sampled_from([" ", "<|im_end|>", "\u00e9\u4e2d\U0001f600", "\ufffd", "a" * 300])
ids = st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=12)
bad_ids = st.lists(st.integers(-3, VOCAB + 3), max_size=12)
stop = text.filter(bool)

# ---- valid bodies: every field in range (a few still fail, e.g. an empty prompt string) ------------
COMMON = {
    "model": st.none(),  # unnamed: the served model (a name it does not serve is a 404, below)
    "temperature": st.floats(0, 2) | st.sampled_from([0, 1e-45, 1e-7, 1e-5, 1e30]),
    "top_p": st.floats(1e-9, 1) | st.sampled_from([1e-320, 5e-324, 1]),
    "top_k": st.integers(-1, VOCAB),
    "n": st.integers(1, 3),
    "stop": stop | st.lists(stop, max_size=3),
    "stop_token_ids": st.lists(st.integers(0, VOCAB - 1), max_size=3),
    "seed": st.integers(-(2**63), 2**64 - 1),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}),
    "ignore_eos": st.booleans(),
    "presence_penalty": st.just(0),
    "user": st.text(max_size=5),
}
MAX_TOKENS = st.integers(1, 6)  # generation stays short
completion_body = st.fixed_dictionaries({"prompt": text | ids | st.lists(text | ids, min_size=1, max_size=3)}, optional={
    **COMMON, "max_tokens": MAX_TOKENS, "logprobs": st.none() | st.integers(0, 20), "echo": st.booleans()})
part = st.fixed_dictionaries({"type": st.just("text")}, optional={"text": text})
message = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "developer", "tool"])},
                                optional={"content": text | st.lists(part, max_size=2), "name": st.text(max_size=5)})
# chat's max_tokens defaults to the whole context window: always give one
chat_body = st.fixed_dictionaries({"messages": st.lists(message, min_size=1, max_size=3), "max_tokens": MAX_TOKENS},
                                  optional={**COMMON, "max_completion_tokens": MAX_TOKENS, "logprobs": st.booleans(),
                                            "top_logprobs": st.integers(0, 20), "tools": st.just([]),
                                            "response_format": st.just({"type": "text"})})

# ---- invalid values, put into an otherwise valid body ------------------------------------------
BAD = {
    "prompt": st.just("") | st.just([]) | bad_ids | st.lists(st.just("a") | bad_ids, max_size=3) | any_json,
    "messages": st.just([]) | st.lists(st.fixed_dictionaries({"role": st.text(max_size=8)}, optional={
        "content": any_json | st.lists(st.fixed_dictionaries({"type": st.text(max_size=5)}), max_size=2)}), max_size=2)
        | any_json,
    "temperature": st.floats(max_value=-1e-9) | any_json,
    "top_p": st.floats(max_value=0) | st.floats(min_value=1.0000001) | any_json,
    "top_k": st.integers(max_value=-2) | st.integers(min_value=VOCAB + 1) | any_json,
    "n": st.integers(max_value=0) | st.integers(min_value=2049) | any_json,
    "logprobs": st.integers(max_value=-1) | st.integers(min_value=21) | any_json,
    "top_logprobs": st.integers(min_value=21) | any_json,
    "seed": st.integers(min_value=2**64) | st.integers(max_value=-(2**63) - 1) | any_json,
    "stop": st.just("") | st.lists(stop, min_size=17, max_size=17) | any_json,
    "stop_token_ids": bad_ids | any_json,
    "logit_bias": st.dictionaries(st.text(max_size=3), st.floats(-2, 2), min_size=1, max_size=2),
    "suffix": st.just("x"), "tools": st.lists(any_json, min_size=1, max_size=1),
    "response_format": st.fixed_dictionaries({"type": st.sampled_from(["json_object", "json_schema"])}),
    "max_tokens": st.integers(max_value=-1) | st.integers(min_value=2100) | st.text(max_size=3) | st.floats(0, 8),
    **{name: any_json for name in ("stream", "stream_options", "echo", "ignore_eos", "model", "user",
                                   "presence_penalty", "frequency_penalty", "best_of", "max_completion_tokens")},
}


@st.composite
def mutated(draw, body):
    """A valid body with one to three fields replaced by invalid values or junk."""
    body = dict(draw(body))
    for name in draw(st.lists(st.sampled_from(sorted(BAD)), min_size=1, max_size=3, unique=True)):
        value = draw(BAD[name])
        if name == "max_tokens" and value is None:
            continue  # null means "fill the context window": valid, and long
        body[name] = value
    return body


def encode(body) -> bytes:
    return json.dumps(body).encode()


raw = st.one_of(
    st.binary(max_size=60),  # malformed bytes
    any_json.map(encode),  # JSON of the wrong shape
    completion_body.map(encode).map(lambda b: b[: len(b) // 2]),  # truncated
    st.just(b'{"prompt": "\\ud800", "max_tokens": 2}'),  # a lone surrogate
)
requests_ = st.one_of(
    st.tuples(st.just("completions"), completion_body.map(encode)),
    st.tuples(st.just("chat/completions"), chat_body.map(encode)),
    st.tuples(st.just("completions"), mutated(completion_body).map(encode)),
    st.tuples(st.just("chat/completions"), mutated(chat_body).map(encode)),
    st.tuples(st.sampled_from(["completions", "chat/completions"]), raw),
)


def test_fuzzed_requests_never_break_the_server(shared):
    url = shared.url
    good = {"prompt": "the fuzzing is over", "max_tokens": 12, "temperature": 0}
    expected = requests.post(url + "/v1/completions", json=good).json()["choices"][0]["text"]
    session = requests.Session()
    seen = {"sent": 0}

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(requests_)
    def fuzz(req):
        path, body = req
        resp = session.post(f"{url}/v1/{path}", data=body, headers={"Content-Type": "application/json"}, timeout=60)
        seen["sent"] += 1
        seen[resp.status_code] = seen.get(resp.status_code, 0) + 1
        assert resp.status_code in (200, 400, 404), (resp.status_code, resp.text, body)
        if resp.status_code in (400, 404):
            err = resp.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["message"], err
            if resp.status_code == 404:  # only for a junk string in `model`
                assert err["code"] == "model_not_found" and isinstance(json.loads(body)["model"], str), (err, body)
        elif resp.headers["Content-Type"].startswith("text/event-stream"):
            events = [line[6:] for line in resp.text.split("\n\n") if line.startswith("data: ")]
            assert events[-1] == "[DONE]" and not any('"error"' in e for e in events[:-1]), (events, body)
            for e in events[:-1]:
                json.loads(e)
        else:
            assert resp.json()["choices"], body

    fuzz()
    assert seen["sent"] >= 2000 and seen.get(200, 0) >= 500 and seen.get(400, 0) >= 500, seen
    assert requests.get(url + "/health").json()["status"] == "ok"
    resp = requests.post(url + "/v1/completions", json=good)
    assert resp.status_code == 200 and resp.json()["choices"][0]["text"] == expected
    wait_idle(url)
