"""Bad requests are refused over HTTP with a 400 and an OpenAI error body naming the field, before
anything reaches the scheduler; the server keeps serving. (tests/unit/test_api.py covers the rules
one by one without a server; this proves the HTTP path: status, body, headers, body size, and that
nothing was scheduled.)"""

from __future__ import annotations

import json

import pytest
import requests

from tests.reliability.conftest import settled

VOCAB = 512  # tiny-llama
CTX = 2048
MSG = [{"role": "user", "content": "hi"}]

# (endpoint, raw body, param the error must name)
BAD = [
    ("completions", {"prompt": [1, 2, VOCAB]}, "prompt"),
    ("completions", {"prompt": [[5], [-1]]}, "prompt"),
    ("completions", {"prompt": [5] * 2000, "max_tokens": 100}, "max_tokens"),
    ("completions", {"prompt": [5] * (CTX + 1), "max_tokens": 1}, "prompt"),
    ("chat/completions", {"messages": [{"role": "user", "content": "x " * 3000}]}, "messages"),
    ("completions", {"prompt": "hi", "temperature": -0.5}, "temperature"),
    ("completions", {"prompt": "hi", "top_p": 0}, "top_p"),
    ("completions", {"prompt": "hi", "top_p": 1.5}, "top_p"),
    ("completions", {"prompt": "hi", "top_k": VOCAB + 1}, "top_k"),
    ("completions", {"prompt": "hi", "n": 0}, "n"),
    ("completions", {"prompt": "hi", "n": 100000}, "n"),
    ("completions", {"prompt": "hi", "logprobs": 21}, "logprobs"),
    ("completions", {"prompt": "hi", "seed": 1 << 70}, "seed"),
    ("chat/completions", {"messages": MSG, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("chat/completions", {"messages": MSG, "max_tokens": -1}, "max_tokens"),
    ("completions", {"prompt": "hi", "max_tokens": "ten"}, "max_tokens"),
    ("completions", {"prompt": "hi", "temperature": "hot"}, "temperature"),
    ("completions", {"prompt": "hi", "n": True}, "n"),
    ("completions", {"prompt": {"text": "hi"}}, "prompt"),
    ("completions", {"max_tokens": 4}, "prompt"),
    ("chat/completions", {"messages": "hi"}, "messages"),
    ("chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
    ("chat/completions", {"messages": [{"content": "hi"}]}, "messages[0].role"),
    ("chat/completions", {"messages": []}, "messages"),
    ("completions", b"", None),
    ("completions", b"{\"prompt\": \"hi\"", None),
    ("completions", b"not json at all", None),
    ("chat/completions", b"[1, 2, 3]", None),
    ("completions", b"\"a string\"", None),
    ("completions", b"null", None),
    ("completions", b"42", None),
]


def post(url: str, path: str, body, **kw) -> requests.Response:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return requests.post(f"{url}/v1/{path}", data=data, headers={"Content-Type": "application/json"}, timeout=30, **kw)


def assert_error(resp: requests.Response, status: int, param, kind: str = "invalid_request_error") -> dict:
    assert resp.status_code == status, resp.text
    assert resp.headers["Content-Type"].startswith("application/json")
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert err["type"] == kind and err["message"] and err["param"] == param, err
    return err


@pytest.mark.parametrize("path,body,param", BAD, ids=[f"{i}-{p}" for i, (_, _, p) in enumerate(BAD)])
def test_bad_request_is_a_400_naming_the_field(shared, path, body, param):
    assert_error(post(shared.url, path, body), 400, param)


def test_a_body_over_max_body_bytes_is_a_413(shared):
    body = json.dumps({"prompt": "x" * 100_000}).encode()  # over --max-body-bytes 65536
    assert "65536" in assert_error(post(shared.url, "completions", body), 413, None)["message"]


def test_nothing_bad_reaches_the_scheduler_and_serving_goes_on(shared):
    good = {"prompt": "a good request", "max_tokens": 8, "temperature": 0}
    expected = post(shared.url, "completions", good).json()["choices"][0]["text"]
    before = settled(shared.url)
    for path, body, _ in BAD:
        assert post(shared.url, path, body).status_code == 400
    after = settled(shared.url)
    assert after["steps_total"] == before["steps_total"], "a bad request reached the ranks"
    key = 'http_errors_total{status="400"}'
    assert after[key] - before.get(key, 0) == len(BAD)
    resp = post(shared.url, "completions", good)
    assert resp.status_code == 200 and resp.json()["choices"][0]["text"] == expected
