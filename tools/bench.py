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
import glob
import json
import os
import random
import shlex
import socket
import subprocess
import sys
import tempfile
import time

from toka.fabric import STOP_FIGURES_ENV
from tools.bench_client import run, run_batch
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


def launch(flags: str, code: str | None = None, figures: str | None = None) -> tuple[subprocess.Popen, str]:
    """toka-launch with `flags` on a free port, once healthy; its output passes on to stderr, and its
    processes write their host figures into the folder `figures` (if given) at their stop. `code`: a folder
    holding another version's toka/ and workers/ for the server to run (this process's client code
    stays); the server starts in it, since `python -m` puts its working folder before PYTHONPATH."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, **({STOP_FIGURES_ENV: figures} if figures else {})}
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
            proc, url = launch(args.launch, args.server_code, figures)
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
