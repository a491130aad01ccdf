"""bench.py's client: a workload's requests sent to a server through the API, live (every request at
once from several client processes) or as one batch job, and the result's token counts and rates."""

from __future__ import annotations

import asyncio
import functools
import json
import queue
import time
from pathlib import Path

import aiohttp

from toka.launch import raise_open_files_limit


async def scrape(session, url: str) -> dict[str, float]:
    """/metrics' samples by name, summed over their labels: the figures the bench reads (running
    sequences, KV tokens, counters) are per replica under --dp, and their sum is the engine's."""
    async with session.get(url + "/metrics") as resp:
        text = await resp.text()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            sample, _, value = line.rpartition(" ")
            name = sample.partition("{")[0]
            out[name] = out.get(name, 0.0) + float(value)
    return out


async def run(url: str, reqs: list[dict], clients: int = 1) -> dict:
    """Every request at once, sent by `clients` processes (request i by client i % clients), so that
    one client's own work (JSON, connections, responses: ~1 ms a request) does not hold back the
    server; timed from the start signal to the last response."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    go, ready, results = ctx.Event(), ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=_client, args=(url, reqs[i::clients], clients, go, ready, results), daemon=True)
             for i in range(clients)]
    for proc in procs:
        proc.start()
    loop = asyncio.get_running_loop()
    for _ in procs:  # each has imported, connected nothing yet, and waits for `go`
        try:
            await loop.run_in_executor(None, functools.partial(ready.get, timeout=120))
        except queue.Empty:
            raise RuntimeError("a client process did not start in 120 s") from None
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session:
        running: list[float] = []
        stop = asyncio.Event()

        async def sample_metrics():
            while not stop.is_set():
                running.append((await scrape(session, url)).get("toka_running", 0.0))
                await asyncio.sleep(0.5)

        sampler = asyncio.create_task(sample_metrics())
        start = time.perf_counter()  # CLOCK_MONOTONIC: the same clock in every process
        go.set()
        usages, end = [], start
        for _ in procs:
            part, error, finished = await loop.run_in_executor(None, results.get)
            if error:
                raise RuntimeError(error)
            usages += part
            end = max(end, finished)
        stop.set()
        await sampler
        metrics = await scrape(session, url)
    for proc in procs:
        proc.join()
    return _result(reqs, end - start, usages, running, metrics)


def connection_limit(requests: int, clients: int = 1) -> int:
    """Connections one of `clients` client processes may hold: within its open-files limit and its
    share of half the local port range. Connections to one server come from one address, whose
    ephemeral ports (~28k on Linux) the clients share with the TIME_WAIT sockets of earlier runs:
    65,536 requests on connections of their own failed with "Cannot assign requested address"."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        ports = (high - low + 1) // (2 * clients)
    except (OSError, ValueError):
        ports = requests
    return max(1, min(requests, raise_open_files_limit() - 256, ports))


def _client(url: str, reqs: list[dict], clients: int, go, ready, results) -> None:
    """One client process: its requests at once on their own connections, once `go` is set; puts
    (usages, error, time of its last response)."""

    async def send() -> list[dict]:
        # one connection per request in flight, within connection_limit; the rest wait in the
        # client, which still keeps far more requests at the server than it runs at once
        connector = aiohttp.TCPConnector(limit=connection_limit(len(reqs), clients))
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None), connector=connector) as session:
            async def one(body):
                async with session.post(url + "/v1/completions", json=body) as resp:
                    data = await resp.json()
                    if resp.status != 200:
                        raise RuntimeError(f"{resp.status}: {data}")
                    return data["usage"]

            ready.put(True)
            await asyncio.get_running_loop().run_in_executor(None, go.wait)
            return await asyncio.gather(*(one(r) for r in reqs))

    try:
        usages = asyncio.run(send())
        results.put((usages, None, time.perf_counter()))
    except Exception as e:  # the parent reports it
        results.put(([], f"{type(e).__name__}: {e}", time.perf_counter()))


async def run_batch(url: str, reqs: list[dict]) -> dict:
    """The same requests as one batch job: uploaded as a JSONL file, run by the server's batch
    runner, timed from the batch's creation until it is completed (polled every 0.2 s); tokens
    from the usage in its output file."""
    lines = "".join(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions", "body": r}) + "\n"
                    for i, r in enumerate(reqs))
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session:
        form = aiohttp.FormData()
        form.add_field("purpose", "batch")
        form.add_field("file", lines.encode(), filename="bench.jsonl", content_type="application/jsonl")
        async with session.post(url + "/v1/files", data=form) as resp:
            upload = await resp.json()
            if resp.status != 200:
                raise RuntimeError(f"upload: {resp.status}: {upload}")
        running: list[float] = []
        start = time.perf_counter()
        async with session.post(url + "/v1/batches", json={"input_file_id": upload["id"], "endpoint": "/v1/completions",
                                                          "completion_window": "24h"}) as resp:
            batch = await resp.json()
            if resp.status != 200:
                raise RuntimeError(f"batch: {resp.status}: {batch}")
        polls = 0
        while batch["status"] not in ("completed", "failed", "cancelled", "expired"):
            await asyncio.sleep(0.2)
            async with session.get(url + f"/v1/batches/{batch['id']}") as resp:
                batch = await resp.json()
            polls += 1
            if polls % 5 == 0:
                running.append((await scrape(session, url)).get("toka_running", 0.0))
        elapsed = time.perf_counter() - start
        if batch["status"] != "completed" or batch["request_counts"]["failed"]:
            raise RuntimeError(f"batch ended {batch['status']}: {batch['request_counts']}, errors {batch.get('errors')}")
        async with session.get(url + f"/v1/files/{batch['output_file_id']}/content") as resp:
            output = await resp.text()
        metrics = await scrape(session, url)
    usages = [json.loads(line)["response"]["body"]["usage"] for line in output.splitlines() if line]
    if len(usages) != len(reqs):
        raise RuntimeError(f"{len(usages)} output lines for {len(reqs)} requests")
    return _result(reqs, elapsed, usages, running, metrics)


def _result(reqs: list[dict], elapsed: float, usages: list[dict], running: list[float], metrics: dict) -> dict:
    out_tokens = sum(u["completion_tokens"] for u in usages)
    prompt_tokens = sum(u["prompt_tokens"] for u in usages)
    busy = [r for r in running if r > 0]
    return {
        "requests": len(reqs),
        "seconds": elapsed,
        "output_tokens": out_tokens,
        "prompt_tokens": prompt_tokens,
        "output_tok_s": out_tokens / elapsed,
        "total_tok_s": (out_tokens + prompt_tokens) / elapsed,
        "mean_running_batch": sum(busy) / max(len(busy), 1),
        # an earlier engine (--server-code) gives pages alone, of 16 tokens unless launched otherwise
        "kv_tokens": metrics.get("toka_kv_cache_tokens", metrics.get("toka_total_pages", 0) * 16),
        **{name: metrics.get(f"toka_{name}_total", metrics.get(f"toka_{name}", 0))  # counters of either naming
           for name in ("preemptions", "prefix_hit_tokens", "grouped_rows")},
    }
