"""Load: 2,000 requests from 200 concurrent clients on the CPU. Every one completes with the greedy
output its prompt gives when sent alone, and afterwards no request state is left in the server and
every KV page is free."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time

import aiohttp
import pytest
import requests

from tests.reliability.conftest import metrics, wait_idle
from toka.launch import LISTEN_BACKLOG

REQUESTS = 2000
CLIENTS = 200
PROMPTS = [f"load test prompt number {i}:" for i in range(40)]


def body(i: int) -> tuple[str, dict]:
    """Request i: a prompt, as a completion or as a chat, streamed or not (a quarter are streamed)."""
    prompt, common = PROMPTS[i % len(PROMPTS)], {"max_tokens": 16, "temperature": 0, "ignore_eos": True,
                                         "stream": i % 4 == 3}
    if i % 2:
        return "chat/completions", {"messages": [{"role": "user", "content": prompt}], **common}
    return "completions", {"prompt": prompt, **common}


def text_of(path: str, raw: bytes, stream: bool) -> str:
    if not stream:
        choice = json.loads(raw)["choices"][0]
        return choice["message"]["content"] if "message" in choice else choice["text"]
    out = []
    for event in raw.decode().split("\n\n"):
        if event.startswith("data: ") and event != "data: [DONE]":
            choice = json.loads(event[6:])["choices"][0]
            out.append(choice["delta"].get("content", "") if "delta" in choice else choice["text"])
    assert raw.decode().rstrip().endswith("data: [DONE]")
    return "".join(out)


def test_2000_requests_from_200_clients(shared):
    url = shared.url
    # what each (endpoint, prompt) gives alone
    expected = {}
    for i in range(2 * len(PROMPTS)):
        path, b = body(i)
        resp = requests.post(f"{url}/v1/{path}", json={**b, "stream": False}, timeout=60)
        expected[i] = text_of(path, resp.content, False)
    assert len(set(expected.values())) >= 20  # distinct, non-trivial outputs

    results: dict[int, str] = {}
    todo = list(range(REQUESTS))

    async def client(session: aiohttp.ClientSession):
        while todo:
            i = todo.pop()
            path, b = body(i)
            async with session.post(f"{url}/v1/{path}", json=b) as resp:
                raw = await resp.read()
                assert resp.status == 200, raw
                results[i] = text_of(path, raw, b["stream"])

    async def main():
        connector = aiohttp.TCPConnector(limit=CLIENTS)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=300)) as session:
            await asyncio.gather(*(client(session) for _ in range(CLIENTS)))

    before = metrics(url)
    t0 = time.monotonic()
    asyncio.run(main())
    took = time.monotonic() - t0
    assert len(results) == REQUESTS
    wrong = [i for i, text in results.items() if text != expected[i % (2 * len(PROMPTS))]]
    assert not wrong, f"{len(wrong)} outputs differ from the prompt's output alone, e.g. request {wrong[0]}"
    m = wait_idle(url)  # no request state in the server, no running or waiting sequence, every page free
    assert m["http_streams"] == 0 and m["free_pages"] == m["total_pages"]
    finished = m['requests_finished_total{reason="length"}'] - before['requests_finished_total{reason="length"}']
    assert finished == REQUESTS
    print(f"{REQUESTS} requests from {CLIENTS} clients in {took:.1f}s")


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2) to read the listen queue")
def test_the_listen_queue_holds_a_burst_of_connections(shared):
    """aiohttp's default accept queue (128) drops the SYNs of a larger burst, and every dropped
    client waits a second or more to retry: the server asks for the kernel's largest."""
    port = shared.url.rsplit(":", 1)[1]
    out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True).stdout
    backlog = int(out.split()[2])  # State Recv-Q Send-Q ...: a listening socket's Send-Q is its backlog
    somaxconn = int(open("/proc/sys/net/core/somaxconn").read())
    assert backlog == min(somaxconn, LISTEN_BACKLOG)
