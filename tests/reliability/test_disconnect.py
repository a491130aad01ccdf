"""Clients that go away mid-generation, streaming or not: every request is aborted in the scheduler
and its KV pages return to the pool; no state is left in the server."""

from __future__ import annotations

import asyncio

import aiohttp

from tests.reliability.conftest import metrics, wait_idle

N = 100


async def disconnect(url: str, i: int) -> str:
    """Starts a long generation and leaves: streams close after the first chunk, the others time out."""
    stream = i % 2 == 0
    if i % 4 < 2:
        path, body = "completions", {"prompt": f"request {i} goes away", "max_tokens": 2000}
    else:
        path, body = "chat/completions", {"messages": [{"role": "user", "content": f"bye {i}"}], "max_tokens": 2000}
    body.update(ignore_eos=True, stream=stream, temperature=0.7, seed=i)
    timeout = aiohttp.ClientTimeout(total=60 if stream else 1.0 + (i % 10) / 10)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        try:
            async with session.post(f"{url}/v1/{path}", json=body) as resp:
                assert resp.status == 200
                if not stream:
                    await resp.read()
                    return "finished"
                async for line in resp.content:
                    if line.startswith(b"data: "):
                        return "left the stream"  # closing the session drops the connection
        except asyncio.TimeoutError:
            return "timed out"
    return "stream ended"


def test_disconnected_requests_are_aborted_and_free_their_pages(shared):
    wait_idle(shared.url)
    before = metrics(shared.url)

    async def main():
        return await asyncio.gather(*(disconnect(shared.url, i) for i in range(N)))

    outcomes = asyncio.run(main())
    assert outcomes.count("left the stream") == N // 2 and outcomes.count("timed out") == N // 2, outcomes
    after = wait_idle(shared.url)
    aborted = after.get('finished_total{reason="abort"}', 0) - before.get('finished_total{reason="abort"}', 0)
    assert aborted == N  # every sequence was aborted in the scheduler, none ran to its end
    gone = after['requests_finished_total{reason="abort"}'] - before.get('requests_finished_total{reason="abort"}', 0)
    assert gone == N  # and the server counted each as given up by its client
    assert after["tokens_generated_total"] > before["tokens_generated_total"]
