"""Servers and probes shared by the reliability tests.

Start-up is the expensive part on 2 cores, so one server (`shared`) serves every test that leaves
it healthy; tests that kill or stop a server start their own, with a small forward budget so the
warm-up is cheap."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.helpers import Server

# Small warm-up, a context window the tests can fill, a body limit the validation test can exceed.
SMALL = ("--max-tokens-per-forward", "128", "--kv-cache-tokens", "4096", "--max-seqs", "64")


def start(model: str, *args: str) -> Server:
    return Server("--model", model, *SMALL, *args)


@pytest.fixture(scope="package")
def shared(tiny_models):
    server = start(tiny_models["tiny-llama"], "--max-body-bytes", "65536")
    yield server
    assert server.stop() == 0, server.output()


@pytest.fixture
def fresh(tiny_models):
    """A factory of servers for one test; whatever it started is killed at the end."""
    servers = []

    def make(*args: str) -> Server:
        servers.append(start(tiny_models["tiny-llama"], *args))
        return servers[-1]

    yield make
    for s in servers:
        if s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait()
        for pid in child_pids(s).values():  # never leave a child behind, even when a test failed
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def metrics(url: str) -> dict[str, float]:
    """Prometheus text -> {"name" or "name{labels}": value}."""
    out = {}
    for line in requests.get(url + "/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key.removeprefix("toka_")] = float(value)
    return out


def total(m: dict[str, float], name: str) -> float | None:
    """A figure summed over replicas (samples `name` or `name{replica=...}`); None when absent."""
    values = [v for k, v in m.items() if k == name or k.startswith(name + "{replica=")]
    return sum(values) if values else None


def idle(m: dict[str, float]) -> bool:
    """No request state left anywhere: server, schedulers, KV caches."""
    return (m.get("http_requests") == 0 and m.get("http_streams") == 0 and total(m, "running") == 0
            and total(m, "waiting") == 0 and total(m, "free_pages") == total(m, "total_pages"))


def wait_idle(url: str, timeout: float = 30) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(url)
        if idle(m):
            return m
        assert time.monotonic() < deadline, f"not idle after {timeout}s: {m}"
        time.sleep(0.2)


def settled(url: str, timeout: float = 30) -> dict[str, float]:
    """Metrics once idle and no longer changing: the scheduler's stats arrive every 0.5 s, so two
    equal readings 0.6 s apart include every step that ran."""
    m = wait_idle(url, timeout)
    deadline = time.monotonic() + timeout
    while True:
        time.sleep(0.6)
        again = wait_idle(url, timeout)
        if again == m:
            return m
        assert time.monotonic() < deadline, "metrics keep changing"
        m = again


def child_pids(server: Server) -> dict[str, int]:
    """The launcher logs "started <name> pid <pid>" for each child it spawns."""
    with open(server.log.name) as f:
        return {name: int(pid) for name, pid in re.findall(r"started ([\w.]+) pid (\d+)", f.read())}


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children, their children ...), from /proc."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parents.items() if pp == p]
        out += kids
        todo += kids
    return out


def alive(pid: int) -> bool:
    """Running or stopped; a zombie (dead, not yet reaped by its new parent) counts as gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_gone(pids, timeout: float = 10) -> list[int]:
    """Waits for every pid to be gone; returns those still alive after `timeout`."""
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [p for p in pids if alive(p)]


def mixed(i: int) -> dict:
    """Request i of a mix: greedy or seeded sampling, n 1 or 3, streamed or not, with logprobs."""
    body = {"prompt": f"mixed request {i}: " + "words " * (i % 7), "max_tokens": 8 + i % 9, "logprobs": 2,
            "return_tokens_as_token_ids": True, "temperature": 0.0 if i % 2 else 0.9, "seed": i,
            "n": 3 if i % 4 == 0 else 1, "stream": i % 3 == 0}
    return body


def outcome(url: str, body: dict) -> list[tuple[list[str], list[float]]]:
    """(tokens, logprobs) of each choice, streamed or not."""
    resp = requests.post(url + "/v1/completions", json=body, stream=body["stream"], timeout=120)
    assert resp.status_code == 200, resp.text
    choices: dict[int, tuple[list[str], list[float]]] = {}
    if body["stream"]:
        lines = [ln[6:] for ln in resp.iter_lines() if ln.startswith(b"data: ") and ln != b"data: [DONE]"]
        parts = [c for ln in lines for c in json.loads(ln)["choices"]]
    else:
        parts = resp.json()["choices"]
    for c in parts:
        tokens, lps = choices.setdefault(c["index"], ([], []))
        tokens += c["logprobs"]["tokens"]
        lps += c["logprobs"]["token_logprobs"]
    return [choices[k] for k in sorted(choices)]


def assert_same_outcomes(url: str, reference: str, bodies: list[dict], tolerance: float = 1e-4) -> None:
    """Every body sent to both servers at once gives the same tokens and logprobs within `tolerance`."""
    with ThreadPoolExecutor(len(bodies)) as pool:
        ours = list(pool.map(lambda b: outcome(url, b), bodies))
        theirs = list(pool.map(lambda b: outcome(reference, b), bodies))
    for body, a, b in zip(bodies, ours, theirs):
        assert [t for t, _ in a] == [t for t, _ in b], body
        for (_, la), (_, lb) in zip(a, b):
            assert max(abs(x - y) for x, y in zip(la, lb)) <= tolerance, body
