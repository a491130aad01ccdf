"""The HTTP path alone: the OpenAI server in front of an engine that costs nothing, so that what the
server process spends per request and per token shows by itself.

    python -m tools.bench_server --model DIR --requests 16384

The stand-in engine runs in the server's event loop, as the engine client's token events do: every
--step-ms it gives one token to each of the --max-seqs oldest open sequences (the rest wait, as in
the scheduler). A client in another process sends the sharegpt-like workload (token-id prompts and
output lengths uniform in [1, 512], ignore_eos: tools/bench.py's workload) all at once. Reports the
wall time against the steps' own (steps x --step-ms), so the difference is the HTTP path's: intake
of the requests before the steps fill, and responses after them, and the server process's CPU
seconds after start-up (per request and per token in the result).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import resource
import socket
import time
from collections import OrderedDict

from toka.protocol import SamplingParams
from toka.server.engine_client import OutputStream
from tools.bench import workload


class InstantEngine:
    """What the server uses of the engine client; tokens come from a ticker instead of ranks."""

    def __init__(self, max_seqs: int, step_s: float, vocab: int):
        self.streams: OrderedDict[int, OutputStream] = OrderedDict()
        self.max_seqs, self.step_s, self.vocab = max_seqs, step_s, vocab
        self.prompt_tokens = 0
        self.dead = None
        self.stats = None
        self.live_count = 1
        self.steps = 0
        self._next_rid = 0
        self._ticker = None

    def start(self) -> None:
        pass

    def replica_stats(self):
        return []

    def submit(self, prompt: list[int], params: SamplingParams, n: int = 1, each_token: bool = True):
        out = []
        for i in range(n):
            s = OutputStream(self._next_rid, len(prompt), len(prompt) // n, params.for_choice(i), each_token, prompt)
            self._next_rid += 1
            self.streams[s.rid] = s
            out.append(s)
        if self._ticker is None:
            self._ticker = asyncio.get_running_loop().create_task(self._tick())
        return out

    def abort(self, s: OutputStream) -> None:
        self.streams.pop(s.rid, None)

    async def _tick(self) -> None:
        while self.streams:
            await asyncio.sleep(self.step_s)
            self.steps += 1
            for rid in list(self.streams)[: self.max_seqs]:
                s = self.streams[rid]
                if s._add((rid * 31 + len(s.tokens)) % (self.vocab - 100) + 100, -0.5, None):
                    del self.streams[rid]
        self._ticker = None


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def serve(args, port: int, ready, done, results) -> None:
    import uvloop
    from aiohttp import web
    from transformers import AutoTokenizer

    from toka.config import EngineConfig
    from toka.server.app import Server

    async def main():
        cfg = EngineConfig(model=args.model, device="cpu", max_seqs=args.max_seqs).resolve()
        engine = InstantEngine(args.max_seqs, args.step_ms / 1e3, cfg.vocab_size)
        server = Server(cfg, AutoTokenizer.from_pretrained(cfg.tokenizer_path), engine)
        server.start()
        runner = web.AppRunner(server.app(), handler_cancellation=True, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port, backlog=65535).start()
        at_ready = cpu_seconds()  # imports and start-up are not the HTTP path's
        ready.set()
        while not done.is_set():
            await asyncio.sleep(0.2)
        results.put(dict(steps=engine.steps, server_cpu_s=cpu_seconds() - at_ready))
        await runner.cleanup()

    uvloop.run(main())


async def client(url: str, reqs: list[dict]) -> float:
    import aiohttp

    from tools.bench_client import connection_limit

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None),
                                     connector=aiohttp.TCPConnector(limit=connection_limit(len(reqs)))) as session:
        async def one(body):
            async with session.post(url + "/v1/completions", json=body) as resp:
                data = await resp.json()
                if resp.status != 200:
                    raise RuntimeError(f"{resp.status}: {data}")

        start = time.perf_counter()
        await asyncio.gather(*(one(r) for r in reqs))
        return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a model folder: its config and tokenizer")
    p.add_argument("--requests", type=int, default=16384)
    p.add_argument("--max-seqs", type=int, default=2048)
    p.add_argument("--step-ms", type=float, default=25.0, help="the stand-in engine's step time")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab", type=int, default=500, help="prompt token ids below this (the model's vocabulary)")
    p.add_argument("--out")
    args = p.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    ready, done, results = ctx.Event(), ctx.Event(), ctx.Queue()
    proc = ctx.Process(target=serve, args=(args, port, ready, done, results))
    proc.start()
    if not ready.wait(120):
        raise SystemExit("the server did not start")
    reqs = workload(argparse.Namespace(workload="sharegpt-like", requests=args.requests, quick=False, seed=args.seed,
                                       vocab=args.vocab, extra={}))
    seconds = asyncio.run(client(f"http://127.0.0.1:{port}", reqs))
    done.set()
    figures = results.get(timeout=60)
    proc.join(30)
    steps = figures["steps"]
    result = dict(requests=args.requests, seconds=seconds, steps=steps, steps_s=steps * args.step_ms / 1e3,
                  http_overhead_s=seconds - steps * args.step_ms / 1e3, server_cpu_s=figures["server_cpu_s"],
                  output_tokens=sum(r["max_tokens"] for r in reqs))
    result.update(server_cpu_us_per_token=1e6 * result["server_cpu_s"] / result["output_tokens"],
                  server_cpu_ms_per_request=1e3 * result["server_cpu_s"] / args.requests)
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
