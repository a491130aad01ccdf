"""Decode step time against its floor, one process per GPU (`--tp N`: N ranks, as the engine runs them).

    python -m tools.bench_step MODEL_DIR --batches 1,64,256,1024 --context 512 [--tp 2]
    python -m tools.bench_step MODEL_DIR --batches 2048 --prefill-tokens 2048 --profile   # mixed steps

For each batch size: the median time of a decode step alone (every row one token at `--context`
cached tokens, CUDA graphs where captured), the host time to build and launch it, the time per step
when steps overlap as on the rank (the next launched before the last finished; tok/s and % of floor
use it), and the floor (tools/floor.py's floor_seconds): 2 x params x batch FLOPs at the matmul rate
plus the weight and KV bytes read at the copy bandwidth, both measured on this card (per GPU: each
rank's shard), plus, with --tp, the measured time of the step's all-reduces alone (2 a layer of
[batch, hidden] activations).

With --prefill-tokens N every step also prefills N prompt tokens (rows of --prefill-len tokens, as
chunked prefill mixes them into decode steps in a live server); such steps run eagerly, outside CUDA
graphs, and their floor adds the prefill FLOPs.

With --groups G --shared S the decode rows form G Hydragen groups of consecutive rows whose first S
cached tokens are the same pages (as n samples of one prompt are), each row's --context tokens its
own after them: the grouped CUDA graphs replay, and the floor reads the shared pages once a group
(the shared-read floor of tools/bench.py's shared-prefix workload). --temperature samples as the
workloads do (0.6 there); the default is greedy.
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import statistics
import tempfile
import time

import torch

from toka.arith import cdiv
from toka.config import EngineConfig
from toka.protocol import SeqParams, StepPlan
from tools.bench import model_costs
from tools.floor import Rates, floor_seconds, measured_rates


def step_plan(step: int, batch: int, context: int, page_size: int, prefill_rows: int = 0,
              prefill_len: int = 0, groups: int = 0, shared: int = 0, page_map: list[int] | None = None) -> StepPlan:
    """Row r decodes in slot r with `context` cached tokens on pages r * pages ...; before them,
    `prefill_rows` rows in the next slots each prefill `prefill_len` tokens from position 0 (the same
    pages every step). With `groups`, the decode rows are that many groups of consecutive rows (as
    even as the rows allow), group g's first `shared` tokens (whole pages) on its own pages after all
    others, each row's `context` tokens after them. The first step enters every row's pages in the
    page table. `page_map` puts page p at page_map[p] (--scatter: pages spread over a large cache)."""
    if shared % page_size or (shared and not groups):
        raise ValueError(f"--shared {shared}: whole pages of {page_size} tokens, with --groups")
    if groups > batch:
        raise ValueError(f"--groups {groups} of {batch} rows: every group needs a row")
    pages = cdiv(context, page_size)
    pre_pages = cdiv(prefill_len, page_size)
    shared_pages = shared // page_size if groups else 0
    group_rows = [batch // groups + (g < batch % groups) for g in range(groups)]
    group_of = [g for g, n in enumerate(group_rows) for _ in range(n)]
    slots = list(range(batch, batch + prefill_rows)) + list(range(batch))
    writes = ([], [], [])
    if step == 0:
        shared_base = batch * pages + prefill_rows * pre_pages
        tables = [[batch * pages + i * pre_pages + j for j in range(pre_pages)] for i in range(prefill_rows)]
        tables += [[shared_base + group_of[r] * shared_pages + j for j in range(shared_pages)]
                   + [r * pages + j for j in range(pages)] for r in range(batch)]
        writes = ([s for s, t in zip(slots, tables) for _ in t], [j for t in tables for j in range(len(t))],
                  [page_map[page] if page_map else page for t in tables for page in t])
    rows = prefill_rows + batch
    table_slots, table_cols, table_pages = writes
    return StepPlan(step_id=step, rids=slots, slots=slots, q_lens=[prefill_len] * prefill_rows + [1] * batch,
                    kv_lens=[prefill_len] * prefill_rows + [shared_pages * page_size + context] * batch,
                    emit=[True] * rows, num_prefill=prefill_rows, prefill_tokens=[1] * (prefill_rows * prefill_len),
                    table_slots=table_slots, table_cols=table_cols, table_pages=table_pages, group_rows=group_rows,
                    group_pages=[shared_pages] * groups)


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


def sustain(runner, plan, seconds: float, clock: bool = True) -> dict:
    """Steps `plan(1)`, `plan(2)`, ... overlapped as the rank runs them, for `seconds`: the time a step
    over the first and the last tenth of them, and with `clock` the card's clock and power over the
    run (tools/card_clock.py; None without nvidia-smi)."""
    from tools.card_clock import ClockSampler

    sampler = ClockSampler.start() if clock else None
    ends = []
    pending, i = runner.launch(plan(1)), 2
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds or len(ends) < 20:
        launched = runner.launch(plan(i))
        runner.finish(pending)
        ends.append(time.perf_counter())
        pending, i = launched, i + 1
    runner.finish(pending)
    card = sampler.stop() if sampler is not None else None
    n = len(ends) // 10

    def per_step(part: list[float]) -> float:
        return (part[-1] - part[0]) / (len(part) - 1) * 1e3

    return dict(seconds=seconds, steps=len(ends), first_ms=per_step(ends[:n]), last_ms=per_step(ends[-n:]), card=card)


def profile_steps(runner, plan, steps: int = 10, show: bool = True) -> None:
    """Where a step's time goes: host functions (cProfile) and GPU kernels (torch.profiler).
    `plan(i)` is the i-th step's plan."""
    import cProfile
    import pstats

    from torch.profiler import ProfilerActivity, profile

    prof = cProfile.Profile()
    prof.enable()
    for i in range(steps):
        runner.finish(runner.launch(plan(i)))
    prof.disable()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        for i in range(steps):
            runner.finish(runner.launch(plan(i)))
    if show:  # every rank runs the steps (their collectives need each other); rank 0 prints
        print(f"--- host, {steps} steps of {len(plan(1).slots)} rows")
        pstats.Stats(prof).sort_stats("tottime").print_stats(20)
        print(f"--- GPU kernels, the same {steps} steps")
        print(p.key_averages().table(sort_by="cuda_time_total", row_limit=20))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--batches", default="1,16,64,256,1024")
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks, one process per GPU")
    p.add_argument("--prefill-tokens", type=int, default=0, help="prompt tokens each step also prefills")
    p.add_argument("--prefill-len", type=int, default=256, help="prompt tokens a prefill row takes")
    p.add_argument("--groups", type=int, default=0, help="Hydragen groups the decode rows form")
    p.add_argument("--shared", type=int, default=0, help="cached tokens a group's rows share (whole pages)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default: greedy)")
    p.add_argument("--no-cuda-graphs", action="store_true")
    p.add_argument("--fill-cache", action="store_true",
                   help="random values in the KV cache, as a served one holds (else zeros, so attention "
                        "outputs nearly zeros to the matmuls after it, which then draw less power)")
    p.add_argument("--scatter", type=float, default=0.0, metavar="GB",
                   help="a KV cache of GB gigabytes with the steps' pages at random places in it (as a served "
                        "cache's pages lie), not packed at its start")
    p.add_argument("--sustain", type=float, default=0.0,
                   help="then run the largest batch's steps, overlapped, for this many seconds: the time a step "
                   "over the first and the last tenth of them, and the card's clock (a served run keeps the card "
                   "busy for minutes, where it may clock lower than in the sweep's bursts)")
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
    pre_rows = cdiv(args.prefill_tokens, args.prefill_len) if args.prefill_tokens else 0
    pre_len = args.prefill_len if pre_rows else 0
    pages = cdiv(args.context, 16) * max_b + pre_rows * cdiv(pre_len, 16) + args.groups * args.shared // 16
    cache_pages = pages + 1
    if args.scatter:  # pages of the model's bf16 KV bytes a token
        cache_pages = max(cache_pages, int(args.scatter * 1e9 / (16 * model_costs(args.model)[1])))
    page_map = random.Random(0).sample(range(cache_pages), pages) if args.scatter else None
    cfg = EngineConfig(model=args.model, device="cuda", load_format="random", kv_cache_tokens=cache_pages * 16,
                       max_seqs=max_b + pre_rows, cuda_graphs=not args.no_cuda_graphs, tp=args.tp,
                       cuda_graph_max_batch=max_b, hydragen=bool(args.groups) or None,
                       max_tokens_per_forward=max(8192, max_b + pre_rows * pre_len)).resolve()
    cfg.run_dir = run_dir
    runner, _ = build(cfg, rank)
    model = runner.model
    params = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    cache = runner.attn.cache.data  # [layers, pages, 2, page_size, kv_heads, head_dim]
    kv_per_token = cache[:, 0, :, 0].numel() * cache.element_size()
    if args.fill_cache:
        for layer in cache:  # a layer at a time: no second copy of the cache
            layer.copy_(torch.randn(layer.shape, dtype=torch.bfloat16, device=layer.device))
    flops_rate, bandwidth = measured_rates(torch.device("cuda"))
    rates = Rates(flops_rate, bandwidth, "measured", "measured", torch.cuda.get_device_name())
    rows = []
    for b in batches:
        plan = functools.partial(step_plan, batch=b, context=args.context, page_size=16, prefill_rows=pre_rows,
                                 prefill_len=pre_len, groups=args.groups, shared=args.shared, page_map=page_map)
        tokens = b + pre_rows * pre_len
        # no logprobs, no filters: the warm-up left other settings in these slots
        runner._admit(StepPlan(step_id=-1, rids=[], slots=[], q_lens=[], kv_lens=[], emit=[], num_prefill=0,
                               prefill_tokens=[], table_slots=[], table_cols=[], table_pages=[], admit=[
                                   SeqParams(slot=s, temperature=args.temperature) for s in range(b + pre_rows)]))
        times, host = [], []
        for i in range(args.steps):
            step_i = plan(i)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            launched = runner.launch(step_i)
            t1 = time.perf_counter()
            runner.finish(launched)
            t2 = time.perf_counter()
            host.append(t1 - t0)
            times.append(t2 - t0)
        step = statistics.median(times[5:])
        # as the rank runs them: step i + 1 launched before step i is finished, so host and device
        # overlap and the time per step is the larger of the two
        pending = runner.launch(plan(args.steps))
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(args.steps):
            launched = runner.launch(plan(args.steps + 1 + i))
            runner.finish(pending)
            pending = launched
        runner.finish(pending)
        pipelined = (time.perf_counter() - t0) / args.steps
        comm = all_reduce_ms(runner, tokens) / 1e3 if args.tp > 1 else 0.0
        kv_read = (b * args.context + args.groups * args.shared) * kv_per_token  # shared pages once a group
        floor = floor_seconds(tokens, params, weight_bytes + kv_read, rates) + comm
        rows.append(dict(batch=b, context=args.context, groups=args.groups, shared=args.shared, step_ms=step * 1e3, host_ms=statistics.median(host[5:]) * 1e3,
                         pipelined_ms=pipelined * 1e3, all_reduce_ms=comm * 1e3, floor_ms=floor * 1e3,
                         pct_of_floor=100 * floor / pipelined, prefill_tokens=tokens - b, tok_s=tokens / pipelined))
    largest = functools.partial(step_plan, batch=max_b, context=args.context, page_size=16, prefill_rows=pre_rows,
                                prefill_len=pre_len, groups=args.groups, shared=args.shared, page_map=page_map)
    # every rank runs the steps; rank 0 samples the clocks (nvidia-smi reads every card)
    sustained = dict(batch=max_b, **sustain(runner, largest, args.sustain, clock=rank == 0)) if args.sustain else None
    if args.profile:
        profile_steps(runner, largest, show=rank == 0)
    if rank:
        return
    print(f"tp {args.tp}: matmul {flops_rate / 1e12:.0f} TFLOP/s, copy {bandwidth / 1e12:.2f} TB/s, "
          f"params {params / 1e9:.2f} B a rank" + (f"; each step also prefills {pre_rows} x {pre_len} tokens "
                                                   "(tok/s counts them)" if pre_rows else "")
          + (f"; decode rows in {args.groups} Hydragen groups sharing {args.shared} cached tokens each, "
             f"--context of their own" if args.groups else ""))
    print(f"{'batch':>6} {'ctx':>5} {'step ms':>8} {'host ms':>8} {'pipe ms':>8} {'allred ms':>9} {'floor ms':>9} "
          f"{'% floor':>8} {'tok/s':>9}")
    for r in rows:
        print(f"{r['batch']:>6} {r['context']:>5} {r['step_ms']:>8.2f} {r['host_ms']:>8.2f} {r['pipelined_ms']:>8.2f} "
              f"{r['all_reduce_ms']:>9.2f} {r['floor_ms']:>9.2f} {r['pct_of_floor']:>8.1f} {r['tok_s']:>9.0f}")
    if sustained:
        card = sustained["card"]
        print(f"{sustained['batch']} rows for {sustained['seconds']:.0f} s ({sustained['steps']} steps): {sustained['first_ms']:.2f} ms "
              f"a step over the first tenth, {sustained['last_ms']:.2f} over the last"
              + (f"; SM clock {card['sm_mhz_mean']:.0f} MHz mean, {card['sm_mhz_min']:.0f} min of "
                 f"{card['sm_mhz_max_card']:.0f}, {card['power_w_mean']:.0f} W" if card else ""))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(flops=flops_rate, bandwidth=bandwidth, rates=rates.as_json(), params=params, rows=rows,
                           sustained=sustained), f, indent=2)


if __name__ == "__main__":
    main()
