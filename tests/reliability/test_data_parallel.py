"""--dp 2 on the CPU: two replicas behind one server give the outputs of one, share the load, send a
shared prefix back where its pages are cached, and survive each other: a dead replica's started
streams fail naming it, the other keeps serving, and the engine ends only with the last one (or at
the first death with --dp-fail-fast)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.reliability.conftest import assert_same_outcomes, child_pids, metrics, mixed, settled, start, wait_gone

PROMPTS = [f"replica test prompt number {i}: " + "tell me a story " * 3 for i in range(6)]


def complete(url: str, prompt, **kw) -> dict:
    resp = requests.post(url + "/v1/completions", json={"prompt": prompt, "temperature": 0, **kw}, timeout=120)
    assert resp.status_code == 200, resp.text
    return resp.json()


@pytest.fixture(scope="module")
def dp2(tiny_models):
    server = start(tiny_models["tiny-llama"], "--dp", "2")
    yield server
    assert server.stop() == 0, server.output()


def test_two_replicas_answer_as_one(dp2, shared):
    health = requests.get(dp2.url + "/health", timeout=5).json()
    assert health == {"status": "ok", "replicas": 2}
    # one request of six prompts: routed one after the other, each to the replica the others left lighter
    ours = [c["text"] for c in sorted(complete(dp2.url, PROMPTS, max_tokens=24)["choices"], key=lambda c: c["index"])]
    assert ours == [complete(shared.url, p, max_tokens=24)["choices"][0]["text"] for p in PROMPTS]
    m = settled(dp2.url)
    assert m['steps_total{replica="0"}'] > 0 and m['steps_total{replica="1"}'] > 0, m
    assert m["replicas_live"] == 2
    out = dp2.output()
    assert "replica 0: cpu" in out and "replica 1: cpu" in out


def test_32_concurrent_mixed_requests_equal_one_replica(dp2, shared):
    assert_same_outcomes(dp2.url, shared.url, [mixed(i) for i in range(32)])


def test_a_shared_prefix_returns_to_its_replica(dp2):
    prefixes = [f"shared prefix {i} " + "of many words " * 12 for i in range(4)]
    before = settled(dp2.url)
    complete(dp2.url, [p + "first" for p in prefixes], max_tokens=16)  # spread over both replicas by load
    spread = settled(dp2.url)
    for k in (0, 1):
        assert spread[f'steps_total{{replica="{k}"}}'] > before[f'steps_total{{replica="{k}"}}']
    hits = [spread[f'prefix_hit_tokens_total{{replica="{k}"}}'] for k in (0, 1)]
    for p in prefixes:  # one at a time, each where its prefix went: its cache holds the prefix
        usage = complete(dp2.url, p + "second", max_tokens=4)["usage"]
        assert usage["prompt_tokens_details"]["cached_tokens"] >= 64, usage  # of ~110: every full page
    after = settled(dp2.url)
    assert all(after[f'prefix_hit_tokens_total{{replica="{k}"}}'] > hits[k] for k in (0, 1))


def stream(url: str, started: threading.Event, prompt: str = "a long story", max_tokens: int = 1500) -> list:
    events = []
    body = {"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0, "stream": True}
    with requests.post(url + "/v1/completions", json=body, stream=True, timeout=120) as resp:
        for line in resp.iter_lines():
            if line.startswith(b"data: "):
                events.append(line[6:].decode())
                started.set()
    return events


def errors(events: list) -> list[str]:
    return [json.loads(e)["error"]["message"] for e in events if e != "[DONE]" and "error" in json.loads(e)]


def test_a_dead_replica_leaves_the_other_serving(tiny_models):
    server = start(tiny_models["tiny-llama"], "--dp", "2")
    try:
        pids = child_pids(server)
        assert set(pids) == {"replica0.rank0", "replica1.rank0", "replica0.scheduler", "replica1.scheduler"}
        with ThreadPoolExecutor(2) as pool:
            started = [threading.Event(), threading.Event()]
            streams = []
            for e in started:  # one after the other: the second goes to the less loaded replica
                streams.append(pool.submit(stream, server.url, e))
                assert e.wait(60)
            os.kill(pids["replica1.rank0"], signal.SIGKILL)
            results = [f.result(timeout=120) for f in streams]
        assert errors(results[0]) == []
        [message] = errors(results[1])
        assert "replica 1" in message and "replica1.rank0 exited with code -9" in message
        assert wait_gone([pids["replica1.scheduler"]]) == []  # the rest of the replica stops
        assert requests.get(server.url + "/health", timeout=5).json() == {"status": "ok", "replicas": 1}
        assert complete(server.url, "still serving", max_tokens=8)["choices"][0]["text"]
        assert metrics(server.url)["replicas_live"] == 1
        os.kill(pids["replica0.rank0"], signal.SIGKILL)  # the last one: the engine is dead
        assert server.proc.wait(timeout=30) != 0
        assert wait_gone(list(pids.values())) == []
    finally:
        server.stop()


def test_fail_fast_ends_the_engine_with_any_replica(tiny_models):
    server = start(tiny_models["tiny-llama"], "--dp", "2", "--dp-fail-fast")
    try:
        pids = child_pids(server)
        os.kill(pids["replica1.rank0"], signal.SIGKILL)
        deadline = time.monotonic() + 30
        while server.proc.poll() is None:
            assert time.monotonic() < deadline, server.output()
            time.sleep(0.1)
        assert server.proc.returncode != 0
        assert wait_gone(list(pids.values())) == []
        assert "engine dead: replica 1 failed" in server.output()
    finally:
        server.stop()


def test_a_dead_replicas_waiting_request_finishes_on_the_other(tiny_models):
    """One sequence a replica (--max-seqs 1): A runs on replica 0, B on replica 1, and C, routed to
    the lighter replica 1, waits behind B. Replica 1 dies: B fails naming it, C (no token yet)
    moves to replica 0 and is answered there once A is done, as if nothing happened."""
    server = start(tiny_models["tiny-llama"], "--dp", "2", "--max-seqs", "1")
    try:
        pids = child_pids(server)
        with ThreadPoolExecutor(3) as pool:
            started = [threading.Event(), threading.Event()]
            a = pool.submit(stream, server.url, started[0], "a long story", 2000)
            assert started[0].wait(60)
            b = pool.submit(stream, server.url, started[1], "another one", 1000)
            assert started[1].wait(60)
            c = pool.submit(complete, server.url, "the third", max_tokens=8, ignore_eos=True)
            deadline = time.monotonic() + 30
            while metrics(server.url).get('waiting{replica="1"}', 0) < 1:  # C queued behind B
                assert time.monotonic() < deadline
                time.sleep(0.05)
            os.kill(pids["replica1.rank0"], signal.SIGKILL)
            assert "replica 1" in errors(b.result(timeout=120))[0]
            assert errors(a.result(timeout=300)) == []
            body = c.result(timeout=300)
        assert body["usage"]["completion_tokens"] == 8 and body["choices"][0]["finish_reason"] == "length"
    finally:
        server.stop()
