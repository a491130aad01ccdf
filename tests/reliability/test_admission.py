"""Admission control: the waiting queue is bounded in sequences and in prompt tokens; past either
bound a request gets a 429 with Retry-After and an OpenAI error body, while the admitted requests
finish correctly."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import requests

from tests.reliability.conftest import metrics, wait_idle

LONG = {"prompt": [10, 11, 12, 13], "max_tokens": 600, "temperature": 0, "ignore_eos": True}


def complete(url: str, body: dict) -> requests.Response:
    return requests.post(url + "/v1/completions", json=body, timeout=120)


def wait_streams(url: str, count: int) -> None:
    deadline = time.monotonic() + 30
    while metrics(url)["http_streams"] < count:
        assert time.monotonic() < deadline
        time.sleep(0.02)


def assert_429(resp: requests.Response) -> None:
    assert resp.status_code == 429, resp.text
    assert int(resp.headers["Retry-After"]) >= 1
    err = resp.json()["error"]
    assert err["type"] == "rate_limit_error" and err["message"] and set(err) == {"message", "type", "param", "code"}


def test_queue_bounds_give_429_and_admitted_requests_finish(fresh):
    # 2 sequences run, 2 may wait; while some wait, at most 40 prompt tokens may be in flight
    server = fresh("--max-seqs", "2", "--max-waiting-requests", "2", "--max-waiting-tokens", "40")
    url = server.url
    expected = complete(url, LONG).json()["choices"][0]["text"]
    with ThreadPoolExecutor(8) as pool:
        admitted = [pool.submit(complete, url, LONG) for _ in range(3)]  # 2 run, 1 waits: 12 tokens
        wait_streams(url, 3)
        assert_429(complete(url, {**LONG, "prompt": [7] * 29, "max_tokens": 1}))  # 12 + 29 tokens > 40
        admitted.append(pool.submit(complete, url, {**LONG, "prompt": [7] * 28}))  # 12 + 28 tokens: fits
        wait_streams(url, 4)
        assert_429(complete(url, {**LONG, "prompt": [7], "max_tokens": 1}))  # a third waiting sequence
        assert_429(complete(url, {**LONG, "prompt": [7], "max_tokens": 1, "n": 2}))
        assert requests.get(url + "/health").status_code == 200  # busy, not unhealthy
        results = [f.result() for f in admitted]
    for r in results:
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "length" and r.json()["usage"]["completion_tokens"] == 600
    assert [r.json()["choices"][0]["text"] for r in results[:3]] == [expected] * 3
    assert metrics(url)['http_errors_total{status="429"}'] == 3
    wait_idle(url)
    # the queue drained: admitted again; an idle engine takes even a request larger than the bounds
    resp = complete(url, {**LONG, "max_tokens": 4, "n": 6, "prompt": [7] * 50})
    assert resp.status_code == 200 and len(resp.json()["choices"]) == 6


def test_n_choices_count_their_prompt_once(fresh):
    """The n choices of a prompt share it (one message, one list): the token bound counts it once,
    so sampling many answers to one long prompt is not refused as n prompts."""
    server = fresh("--max-seqs", "2", "--max-waiting-requests", "64", "--max-waiting-tokens", "40")
    url = server.url
    with ThreadPoolExecutor(8) as pool:
        running = [pool.submit(complete, url, LONG) for _ in range(2)]  # 8 prompt tokens in flight
        wait_streams(url, 2)
        many = pool.submit(complete, url, {**LONG, "prompt": [7] * 30, "max_tokens": 3, "n": 8,
                                           "temperature": 1.0, "seed": 5})  # 8 + 30 tokens, not 8 + 240
        wait_streams(url, 3)
        assert_429(complete(url, {**LONG, "prompt": [7] * 3, "max_tokens": 1}))  # 38 + 3 > 40
        resp = many.result()
        assert all(f.result().status_code == 200 for f in running)
    assert resp.status_code == 200, resp.text
    choices = resp.json()["choices"]
    assert [c["index"] for c in choices] == list(range(8))
    assert len({c["text"] for c in choices}) > 1  # each choice its own seed
    assert resp.json()["usage"]["prompt_tokens"] == 30
