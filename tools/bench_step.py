"""Decode step time against its floor, one process per GPU (`--tp N`: N ranks, as the engine runs them).

    python tools/bench_step.py MODEL_DIR --batches 1,64,256,1024 --context 512 [--tp 2]

For each batch size: the median time of a decode step alone (every row one token at `--context`
cached tokens, CUDA graphs where captured), the host time to build and launch it, the time per step
when steps overlap as on the rank (the next launched before the last finished; tok/s and % of floor
use it), and the floor: 2 x params x batch FLOPs at the measured matmul rate plus the weight and
KV bytes read at the measured copy bandwidth (per GPU: each rank's shard), plus, with --tp, the
measured time of the step's all-reduces alone (2 a layer of [batch, hidden] activations).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

from toka.config import EngineConfig
from toka.protocol import SeqParams, StepPlan


def measured_rates(device) -> tuple[float, float]:
    """(bf16 matmul FLOP/s, device memory bytes/s counting reads and writes)."""
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    x = torch.empty(2**28, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)

    def timed(fn, reps=20):
        fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3 / reps

    flops = 2 * 8192**3 / timed(lambda: a @ b)
    bandwidth = 2 * x.numel() / timed(lambda: y.copy_(x))
    return flops, bandwidth


def decode_plan(step: int, batch: int, context: int, page_size: int) -> StepPlan:
    """Row r decodes in slot r with `context` cached tokens on pages r * pages ...; the first step
    enters the pages in the page table, later ones only decode."""
    pages = -(-context // page_size)
    writes = ([], [], []) if step else ([r for r in range(batch) for _ in range(pages)], list(range(pages)) * batch,
                                        list(range(batch * pages)))
    return StepPlan(step, list(range(batch)), list(range(batch)), [1] * batch, [context] * batch, [True] * batch, 0,
                    [], *writes)


def all_reduce_ms(runner, batch: int, reps: int = 10) -> float:
    """Device time of one step's all-reduces alone: two a layer of [batch, hidden] activations."""
    import torch.distributed as dist

    cfg = runner.model.config
    x = torch.zeros(batch, cfg.hidden_size, dtype=torch.bfloat16, device=runner.device)
    n = 2 * cfg.num_hidden_layers

    def once():
        for _ in range(n):
            dist.all_reduce(x)

    once()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        once()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps * 1e3


def profile_steps(runner, batch: int, context: int, steps: int = 10, show: bool = True) -> None:
    """Where a decode step's time goes: host functions (cProfile) and GPU kernels (torch.profiler)."""
    import cProfile
    import pstats

    from torch.profiler import ProfilerActivity, profile

    prof = cProfile.Profile()
    prof.enable()
    for i in range(steps):
        runner.finish(runner.launch(decode_plan(i, batch, context, 16)))
    prof.disable()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        for i in range(steps):
            runner.finish(runner.launch(decode_plan(i, batch, context, 16)))
    if show:  # every rank runs the steps (their collectives need each other); rank 0 prints
        print(f"--- host, {steps} steps of batch {batch}")
        pstats.Stats(prof).sort_stats("tottime").print_stats(20)
        print(f"--- GPU kernels, {steps} steps of batch {batch}")
        print(p.key_averages().table(sort_by="cuda_time_total", row_limit=20))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--batches", default="1,16,64,256,1024")
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks, one process per GPU")
    p.add_argument("--no-cuda-graphs", action="store_true")
    p.add_argument("--profile", action="store_true",
                   help="after the sweep, profile steps of the largest batch: host functions and GPU kernels")
    p.add_argument("--out")
    args = p.parse_args()
    if args.tp == 1:
        run(0, args, "")
    else:
        import torch.multiprocessing as mp

        with tempfile.TemporaryDirectory() as run_dir:
            mp.spawn(run, args=(args, run_dir), nprocs=args.tp)


def run(rank: int, args, run_dir: str) -> None:
    from workers.rank import build

    batches = [int(b) for b in args.batches.split(",")]
    max_b = max(batches)
    pages = -(-args.context // 16) * max_b
    cfg = EngineConfig(model=args.model, device="cuda", load_format="random", kv_cache_tokens=(pages + 1) * 16,
                       max_seqs=max_b, cuda_graphs=not args.no_cuda_graphs, tp=args.tp,
                       cuda_graph_max_batch=max_b).resolve()
    cfg.run_dir = run_dir
    runner, _ = build(cfg, rank)
    model = runner.model
    params = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    cache = runner.attn.cache.data  # [layers, pages, 2, page_size, kv_heads, head_dim]
    kv_per_token = cache[:, 0, :, 0].numel() * cache.element_size()
    flops_rate, bandwidth = measured_rates(torch.device("cuda"))
    rows = []
    for b in batches:
        # greedy, no logprobs: the warm-up left other settings in these slots
        runner._admit(StepPlan(-1, [], [], [], [], [], 0, [], [], [], [],
                               admit=[SeqParams(s, 0.0, 1.0, 0, 0, -1, -1) for s in range(b)]))
        times, host = [], []
        for i in range(args.steps):
            plan = decode_plan(i, b, args.context, 16)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            launched = runner.launch(plan)
            t1 = time.perf_counter()
            runner.finish(launched)
            t2 = time.perf_counter()
            host.append(t1 - t0)
            times.append(t2 - t0)
        step = statistics.median(times[5:])
        # as the rank runs them: step i + 1 launched before step i is finished, so host and device
        # overlap and the time per step is the larger of the two
        pending = runner.launch(decode_plan(args.steps, b, args.context, 16))
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(args.steps):
            launched = runner.launch(decode_plan(args.steps + 1 + i, b, args.context, 16))
            runner.finish(pending)
            pending = launched
        runner.finish(pending)
        pipelined = (time.perf_counter() - t0) / args.steps
        comm = all_reduce_ms(runner, b) / 1e3 if args.tp > 1 else 0.0
        floor = 2 * params * b / flops_rate + (weight_bytes + b * args.context * kv_per_token) / bandwidth + comm
        rows.append(dict(batch=b, context=args.context, step_ms=step * 1e3, host_ms=statistics.median(host[5:]) * 1e3,
                         pipelined_ms=pipelined * 1e3, all_reduce_ms=comm * 1e3, floor_ms=floor * 1e3,
                         pct_of_floor=100 * floor / pipelined, tok_s=b / pipelined))
    if args.profile:
        profile_steps(runner, max_b, args.context, show=rank == 0)
    if rank:
        return
    print(f"tp {args.tp}: matmul {flops_rate / 1e12:.0f} TFLOP/s, copy {bandwidth / 1e12:.2f} TB/s, "
          f"params {params / 1e9:.2f} B a rank")
    print(f"{'batch':>6} {'ctx':>5} {'step ms':>8} {'host ms':>8} {'pipe ms':>8} {'allred ms':>9} {'floor ms':>9} "
          f"{'% floor':>8} {'tok/s':>9}")
    for r in rows:
        print(f"{r['batch']:>6} {r['context']:>5} {r['step_ms']:>8.2f} {r['host_ms']:>8.2f} {r['pipelined_ms']:>8.2f} "
              f"{r['all_reduce_ms']:>9.2f} {r['floor_ms']:>9.2f} {r['pct_of_floor']:>8.1f} {r['tok_s']:>9.0f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(flops=flops_rate, bandwidth=bandwidth, params=params, rows=rows), f, indent=2)


if __name__ == "__main__":
    main()
