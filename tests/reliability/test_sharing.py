"""Prefix sharing under pressure: many clients send prompts that share long prefixes, with n > 1,
into a small KV cache (preemption, eviction of cached pages) with Hydragen grouping every step
it can, and some clients leave early. Every completed output equals its prompt's greedy output
sent alone, and afterwards every page is free."""

from __future__ import annotations

import asyncio
import random

import aiohttp
import requests

from tests.reliability.conftest import wait_idle

PREFIXES = [" ".join(f"shared{p} block {i}" for i in range(12)) for p in range(3)]
PROMPTS = [f"{PREFIXES[i % 3]} question {i}:" for i in range(12)]


def test_shared_prefixes_n_and_hydragen_under_pressure(fresh):
    server = fresh("--hydragen", "--hydragen-min-group", "2", "--hydragen-min-prefix", "16")
    url = server.url
    common = {"max_tokens": 96, "temperature": 0, "ignore_eos": True}  # 64 x 96 > the 4,096-token cache
    alone = {}
    for i, prompt in enumerate(PROMPTS):
        resp = requests.post(url + "/v1/completions", json={"prompt": prompt, **common}, timeout=60).json()
        alone[i] = resp["choices"][0]["text"]
    rng = random.Random(0)
    jobs = [(rng.randrange(len(PROMPTS)), rng.choice([1, 3]), rng.random() < 0.15) for _ in range(80)]
    results: dict[int, list[str]] = {}

    async def one(session, k: int, i: int, n: int, leave: bool):
        body = {"prompt": PROMPTS[i], "n": n, **common}
        if leave:  # gone before the answer: its sequences are aborted, their pages released
            try:
                await session.post(url + "/v1/completions", json=body, timeout=aiohttp.ClientTimeout(total=0.3))
            except asyncio.TimeoutError:
                pass
            return
        async with session.post(url + "/v1/completions", json=body) as resp:
            data = await resp.json()
            assert resp.status == 200, data
            results[k] = [c["text"] for c in data["choices"]]

    async def main():
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
            await asyncio.gather(*(one(session, k, *job) for k, job in enumerate(jobs)))

    asyncio.run(main())
    kept = [k for k, job in enumerate(jobs) if not job[2]]
    assert sorted(results) == kept
    for k in kept:
        i, n, _ = jobs[k]
        assert results[k] == [alone[i]] * n, f"job {k} (prompt {i}, n {n}) differs from the prompt alone"
    m = wait_idle(url)
    assert m["prefix_hit_tokens_total"] > 0 and m["grouped_rows_total"] > 0
    assert m["preemptions_total"] > 0, "the cache was meant to be too small for the load"
