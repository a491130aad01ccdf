"""A dead or hung engine process: in-flight requests end with an error within 10 s (a 5xx, or an
error event and the end of the stream), /health answers 503 while the launcher shuts down, and
the launcher exits non-zero leaving no process behind."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import requests

from tests.reliability.conftest import child_pids, descendants, metrics, wait_gone

BODY = {"prompt": "a long story", "max_tokens": 2000, "ignore_eos": True, "temperature": 0}


def plain(url: str) -> tuple[float, int, dict]:
    resp = requests.post(url + "/v1/completions", json=BODY, timeout=60)
    return time.monotonic(), resp.status_code, resp.json()


def streamed(url: str, started: threading.Event) -> tuple[float, int, list]:
    events = []
    with requests.post(url + "/v1/completions", json={**BODY, "stream": True}, stream=True, timeout=60) as resp:
        for line in resp.iter_lines():
            if line.startswith(b"data: "):
                events.append(line[6:].decode())
                started.set()
    return time.monotonic(), resp.status_code, events


def watch_health(url: str, seen: list, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            seen.append(requests.get(url + "/health", timeout=1).status_code)
        except requests.RequestException:
            seen.append(None)
        time.sleep(0.02)


def assert_engine_death(server, kill) -> None:
    """Runs 2 plain and 2 streamed requests, calls kill(pids) and checks how everything ends."""
    url = server.url
    pids = child_pids(server)
    assert set(pids) == {"rank0", "scheduler"}
    family = descendants(server.proc.pid)
    assert set(pids.values()) <= set(family)
    pool = ThreadPoolExecutor(4)
    started = [threading.Event(), threading.Event()]
    streams = [pool.submit(streamed, url, e) for e in started]
    plains = [pool.submit(plain, url) for _ in range(2)]
    for e in started:
        assert e.wait(30)
    deadline = time.monotonic() + 30
    while metrics(url)["http_streams"] < 4:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    health, stop = [], threading.Event()
    watcher = threading.Thread(target=watch_health, args=(url, health, stop))
    watcher.start()
    t0 = time.monotonic()
    kill(pids)
    try:
        for f in plains:
            end, status, body = f.result(timeout=20)
            assert 500 <= status < 600 and end - t0 < 10, (status, body, end - t0)
            assert body["error"]["type"] == "server_error" and body["error"]["message"]
        for f in streams:
            end, status, events = f.result(timeout=20)
            assert status == 200 and end - t0 < 10, end - t0
            errors = [i for i, e in enumerate(events) if e != "[DONE]" and "error" in json.loads(e)]
            assert errors, events[-3:]
            assert all(e == "[DONE]" for e in events[errors[-1] + 1:])  # nothing but the end after the error
        assert server.proc.wait(timeout=20) != 0
    finally:
        stop.set()
        watcher.join()
        pool.shutdown(wait=False, cancel_futures=True)
    assert 503 in health, health  # observed while the launcher was going down
    assert 200 not in health[health.index(503):]
    assert wait_gone(family) == []
    assert "engine dead" in server.output()


def test_rank_killed(fresh):
    server = fresh()
    assert_engine_death(server, lambda pids: os.kill(pids["rank0"], signal.SIGKILL))
    assert "rank0 exited with code -9" in server.output()


def test_scheduler_killed(fresh):
    server = fresh()
    assert_engine_death(server, lambda pids: os.kill(pids["scheduler"], signal.SIGKILL))
    assert "scheduler exited with code -9" in server.output()


def test_hung_step_counts_as_dead(fresh):
    server = fresh("--step-timeout", "2")
    assert_engine_death(server, lambda pids: os.kill(pids["rank0"], signal.SIGSTOP))
    assert "hung" in server.output()

