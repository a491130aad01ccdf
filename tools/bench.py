"""Throughput benchmark through the HTTP API.

    python -m tools.bench --launch "--model DIR --load-format random" --workload random \
        --requests 1024 --input-len 256 --output-len 256 --out result.json

Workloads (all with ignore_eos and fixed seeds, submitted at once by --clients processes; --via
batch: as one batch job through /v1/files and /v1/batches instead, timed from the batch's creation
to its completion):
  random         N requests of exactly --input-len random prompt tokens and --output-len outputs
  sharegpt-like  N requests (default 65,536; --quick 16,384), prompt and output lengths uniform in
                 [1, 512], n=1, temperature 0
  shared-prefix  N prompts (default 128; --quick 32) of 800 tokens, n=1024, 256 outputs, temperature 0.6
Reports output and total tokens/s, the mean running batch (sampled from /metrics), the KV size and
the percentage of the speed of light: the time the workload needs at least on the card
(tools/floor.py's floor_seconds), 2 x matmul params FLOPs per token (prompt and output) at the
matmul rate, plus the KV cache bytes each decode step reads (its whole context, once per sequence:
no prefix sharing) at the copy bandwidth (bytes read + written per second); for n > 1 also the floor
when a request's sequences read their shared prompt once per step. The floor of a launch on several
GPUs (--tp x --pp x --dp) splits the work evenly among them. With --launch, the server's output
passes through to stderr and the result's "engine" holds the host figures its ranks and schedulers
write at their stop (engine_figures). Where nvidia-smi runs, "card" holds the SM clock, power and
temperature over the run (tools/card_clock.py): a card may run a long workload at a lower clock than
the burst that measured its rates (a card at its power limit does), and where the busy samples' clock
is known the result also gives the share of the floor with the matmul rate scaled to that clock.

--server-code DIR serves with another version's engine (an earlier commit's toka/ and workers/)
while this client measures it: an A/B of two versions with one client (tools/gpu.py ab).

The rates are the card's own: --flops and --bandwidth when given, else measured before the server
starts (tools/floor.py in a subprocess, on the first GPU this process sees: the server's first).
The result's "rates" says which were given and which measured. Without CUDA and without both flags
the share is left out and "speed_of_light" says why.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import glob
import json
import os
import queue
import random
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from toka.fabric import STOP_FIGURES_ENV
from toka.launch import raise_open_files_limit
from tools.card_clock import ClockSampler
from tools.floor import Rates, card_rates, floor_seconds


def workload(args) -> list[dict]:
    rng = random.Random(args.seed)
    lo, hi = 100, args.vocab  # skip the low ids where special tokens usually live
    reqs = []
    if args.workload == "random":
        for _ in range(args.requests or 1024):
            reqs.append(dict(prompt=[rng.randrange(lo, hi) for _ in range(args.input_len)],
                             max_tokens=args.output_len, temperature=0.0))
    elif args.workload == "sharegpt-like":
        for _ in range(args.requests or (16384 if args.quick else 65536)):
            reqs.append(dict(prompt=[rng.randrange(lo, hi) for _ in range(rng.randint(1, 512))],
                             max_tokens=rng.randint(1, 512), temperature=0.0))
    elif args.workload == "shared-prefix":
        for i in range(args.requests or (32 if args.quick else 128)):
            reqs.append(dict(prompt=[rng.randrange(lo, hi) for _ in range(800)], max_tokens=256,
                             temperature=0.6, n=1024, seed=i))
    for r in reqs:
        r.update(ignore_eos=True, **args.extra)  # no model name: the server's own
    return reqs


def model_costs(model_dir: str) -> tuple[float, float]:
    """(matmul parameters, KV cache bytes per token) of a Hugging Face config, at 2 bytes a value."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_dir)
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv_heads = c.num_key_value_heads
    per_layer = c.hidden_size * hd * (2 * c.num_attention_heads + 2 * kv_heads) + 3 * c.hidden_size * c.intermediate_size
    params = c.num_hidden_layers * per_layer + c.vocab_size * c.hidden_size  # + the LM head; lookups are free
    return params, c.num_hidden_layers * 2 * kv_heads * hd * 2


def speed_of_light_seconds(reqs: list[dict], params: float, kv_bytes: float, rates: Rates,
                           shared: bool = False) -> float:
    """shared: the n sequences of a request read their common prompt once per step between them
    (as Hydragen does), not once each."""
    tokens = kv_reads = 0
    for r in reqs:
        p, o, n = len(r["prompt"]), r["max_tokens"], r.get("n", 1)
        tokens += p + n * o
        kv_reads += (1 if shared else n) * o * p + n * o * (o - 1) // 2  # decode step i reads p + i tokens
    return floor_seconds(tokens, params, kv_reads * kv_bytes, rates)


def flag(flags: list[str], name: str, default: str | None = None) -> str | None:
    """The value of launch flag `name` (`--tp 2` or `--tp=2`; the last one counts, as argparse takes it)."""
    value = default
    for i, f in enumerate(flags):
        if f == name and i + 1 < len(flags):
            value = flags[i + 1]
        elif f.startswith(name + "="):
            value = f.split("=", 1)[1]
    return value


def launch_gpus(flags: list[str]) -> int:
    """GPUs a launch with these flags runs on: tp x pp x dp."""
    return int(flag(flags, "--tp", "1")) * int(flag(flags, "--pp", "1")) * int(flag(flags, "--dp", "1"))


def speed_of_light(reqs: list[dict], model: str, rates: Rates, gpus: int, seconds: float,
                   card: dict | None = None) -> dict:
    """The result's floor fields for a run of `seconds` on `gpus` cards of `rates` each. With the
    run's `card` figures (tools/card_clock.py) where they hold the busy samples' clock, also the
    share of the floor at the clock the card kept while busy: the matmul rate is measured in a burst
    at the card's top clock, and a card held down by its power limit runs its matmuls at the lower
    clock's rate (the bandwidth is left as measured)."""
    params, kv_bytes = model_costs(model)
    total = Rates(rates.flops * gpus, rates.bandwidth * gpus, rates.flops_from, rates.bandwidth_from)
    shared = any(r.get("n", 1) > 1 for r in reqs)
    floor = speed_of_light_seconds(reqs, params, kv_bytes, total)
    out = dict(speed_of_light_s=floor, pct_of_speed_of_light=100 * floor / seconds)
    if shared:
        floor = speed_of_light_seconds(reqs, params, kv_bytes, total, shared=True)
        out.update(speed_of_light_shared_s=floor, pct_of_speed_of_light_shared=100 * floor / seconds)
    if card and card.get("sm_mhz_busy"):
        clock = min(1.0, card["sm_mhz_busy"] / card["sm_mhz_max_card"])
        served = Rates(total.flops * clock, total.bandwidth, total.flops_from, total.bandwidth_from)
        floor = speed_of_light_seconds(reqs, params, kv_bytes, served, shared=shared)
        out.update(served_clock=clock, pct_of_speed_of_light_at_served_clock=100 * floor / seconds)
    return out


async def scrape(session, url: str) -> dict[str, float]:
    async with session.get(url + "/metrics") as resp:
        text = await resp.text()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
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
        "kv_tokens": metrics.get("toka_total_pages", 0) * 16,
        **{name: metrics.get(f"toka_{name}_total", metrics.get(f"toka_{name}", 0))  # counters of either naming
           for name in ("preemptions", "prefix_hit_tokens", "grouped_rows")},
    }


def engine_figures(folder: str) -> dict:
    """The host figures the engine's processes wrote at their stop (TOKA_STOP_FIGURES, toka/fabric.py)
    into `folder`: per replica, rank 0's steps, their span and its ms a step launching, the device
    waiting for plans and from a step's end to the next one's forward; the scheduler's ms a step
    planning and taking results. An engine that writes none (an earlier version's) gives empty lists."""
    ranks, schedulers = [], []
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        role = os.path.basename(path)[:-len(".json")].rpartition(".")[2]  # rank0, or replica1.rank0
        with open(path) as f:
            fig = json.load(f)
        if not fig["steps"]:
            continue
        per_step = 1e3 / fig["steps"]
        if role == "rank0":
            ranks.append(dict(steps=fig["steps"], span_s=fig["span_s"], launching_ms=fig["launching_s"] * per_step,
                              plan_wait_ms=fig["idle_s"] * per_step, host_wait_ms=fig["host_wait_s"] * per_step))
        elif role == "scheduler":
            schedulers.append(dict(steps=fig["steps"], planning_ms=fig["planning_s"] * per_step,
                                   results_ms=fig["results_s"] * per_step))
    return dict(ranks=ranks, schedulers=schedulers)


def launch(flags: str, figures: str, code: str | None = None) -> tuple[subprocess.Popen, str]:
    """toka-launch with `flags` on a free port, once healthy; its output passes on to stderr, and its
    processes write their host figures into the folder `figures` at their stop. `code`: a folder
    holding another version's toka/ and workers/ for the server to run (this process's client code
    stays); the server starts in it, since `python -m` puts its working folder before PYTHONPATH."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, STOP_FIGURES_ENV: figures}
    if code is not None:
        code = os.path.abspath(code)
        if not os.path.isdir(os.path.join(code, "toka")):
            sys.exit(f"--server-code {code} holds no toka/: git archive REV toka workers | tar -x -C {code}")
        path = [code, *filter(None, [os.environ.get("PYTHONPATH")])]
        env["PYTHONPATH"] = os.pathsep.join(path)  # for any process that starts elsewhere
    proc = subprocess.Popen([sys.executable, "-m", "toka.launch", "--port", str(port), *shlex.split(flags)],
                            cwd=code, env=env, stdout=sys.stderr)
    url = f"http://127.0.0.1:{port}"
    import urllib.request

    while True:
        if proc.poll() is not None:
            sys.exit(f"server exited with {proc.returncode}")
        try:
            if urllib.request.urlopen(url + "/health", timeout=1).status == 200:
                return proc, url
        except OSError:
            time.sleep(1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:10210")
    p.add_argument("--launch", help="start toka-launch with these flags instead of using --url")
    p.add_argument("--server-code", help="with --launch: the server runs the toka/ and workers/ in this folder "
                   "(e.g. an earlier commit's: git archive REV toka workers | tar -x -C DIR); paths in --launch "
                   "absolute")
    p.add_argument("--workload", default="random", choices=["random", "sharegpt-like", "shared-prefix"])
    p.add_argument("--requests", type=int, default=0)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", help="model folder for the speed of light (default: --model in --launch)")
    p.add_argument("--flops", type=float, help="bf16 matmul FLOP/s of one card (default: measured)")
    p.add_argument("--bandwidth", type=float,
                   help="device copy bytes/s of one card, read + written (default: measured)")
    p.add_argument("--via", choices=["live", "batch"], default="live",
                   help="live: every request at once through /v1/completions; batch: the same requests as one "
                   "batch job (/v1/files, /v1/batches)")
    p.add_argument("--clients", type=int, default=min(8, max(1, (os.cpu_count() or 1) // 2)),
                   help="live: processes sending the requests (default: half the cores, at most 8)")
    p.add_argument("--extra", type=json.loads, default={},
                   help='JSON merged into every request body, e.g. \'{"repetition_penalty": 1.1}\'')
    p.add_argument("--out")
    args = p.parse_args()
    proc = None
    url = args.url
    flags = shlex.split(args.launch or "")
    model = args.model or flag(flags, "--model")
    rates, why_no_floor = None, "no --model to cost the workload with"
    if model:
        try:  # before the launch: the probe's memory is freed before the server sizes its KV cache
            rates = card_rates(args.flops, args.bandwidth)
        except RuntimeError as e:
            why_no_floor = str(e)
            print(f"bench: {e}; the speed of light is left out", file=sys.stderr)
    reqs = workload(args)
    with tempfile.TemporaryDirectory(prefix="toka-bench-") as figures:  # the engine's stop figures
        if args.launch:
            proc, url = launch(args.launch, figures, args.server_code)
        sampler = ClockSampler.start()  # over the run alone: the server is up
        try:
            result = asyncio.run(run_batch(url, reqs) if args.via == "batch" else run(url, reqs, args.clients))
        finally:
            card = sampler.stop() if sampler is not None else None
            if proc is not None:
                proc.terminate()
                proc.wait(60)
        engine = engine_figures(figures) if proc is not None else None
    gpus = launch_gpus(flags)
    result.update(workload=args.workload, quick=args.quick, via=args.via, launch=args.launch, gpus=gpus,
                  clients=args.clients if args.via == "live" else None,
                  server_code=args.server_code and os.path.abspath(args.server_code),
                  rates=rates.as_json() if rates else None, engine=engine, card=card)
    if rates:
        result.update(speed_of_light(reqs, model, rates, gpus, result["seconds"], card))
    else:
        result.update(speed_of_light=why_no_floor)
    print(json.dumps(result, indent=2))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
