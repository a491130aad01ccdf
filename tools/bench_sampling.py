"""The fused sampling kernel alone at a served step's shape (CUDA): 2,048 rows of Llama-3's 128,256
bf16 logits by default, greedy and at temperature 0.6, under each choice of pieces a row and warps
a program (`--configs SLICES:WARPS,...`, the engine's first).

    python -m tools.bench_sampling [--rows 2048] [--vocab 128256] [--configs 1:4,2:4,4:4,1:8] [--out DIR]

Each figure is the median device time of graph replays of several calls (`bench_fp8.graph_us`),
against one read of the logits at the card's copy bandwidth (measured first by tools/floor.py's
probe, or `--bandwidth`): the kernel is bound by its instructions, not by that read, so the share says how
far it is from the bytes alone. One program a row leaves the last of an H200's waves a tenth full
at 2,048 rows (workers/sampling_kernel.py); pieces of a row and warps a program change the waves.
Prints one JSON object and writes it to DIR/bench_sampling.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from tools.bench_fp8 import graph_us
from tools.floor import measured_rates
from workers.sampling import row_keys
from workers.sampling_kernel import SLICES, WARPS, fused_sample

CALLS = 8  # a graph's calls: each reads the whole batch of logits, far beyond the L2 cache


def configs(spec: str) -> list[tuple[int, int]]:
    try:
        out = [tuple(int(v) for v in c.split(":")) for c in spec.split(",") if c]
    except ValueError:
        out = []
    if not out or any(len(c) != 2 or min(c) < 1 for c in out):
        raise SystemExit(f"--configs {spec!r}: SLICES:WARPS pairs of positive integers, comma-separated")
    return out


def bench(rows: int, vocab: int, temperature: float, slices: int, warps: int, bandwidth: float) -> dict:
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = (torch.randn(rows, vocab, generator=g, device="cuda") * 3).bfloat16()
    temp = torch.full((rows,), temperature, device="cuda")
    keys = row_keys(torch.arange(rows, device="cuda") * 7919, torch.arange(rows, device="cuda") + 100)
    random = temperature > 0
    us = graph_us([lambda: fused_sample(logits, temp, keys, random, slices=slices, warps=warps)] * CALLS)
    floor_us = logits.numel() * logits.element_size() / bandwidth * 1e6
    return dict(rows=rows, vocab=vocab, temperature=temperature, slices=slices, warps=warps, ms=us / 1e3,
                pct_of_read=100 * floor_us / us)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--temperatures", default="0,0.6", help="comma-separated; 0 is greedy")
    p.add_argument("--configs", default=",".join(dict.fromkeys(
                       f"{SLICES}:{WARPS},1:4,2:4,3:4,4:4,{SLICES}:8,1:8".split(","))),
                   help="SLICES:WARPS pairs (pieces a row, warps a program)")
    p.add_argument("--bandwidth", type=float, default=None, help="bytes/s of a device copy (measured if not given)")
    p.add_argument("--out", type=Path, default=None, help="folder for bench_sampling.json")
    args = p.parse_args(argv)
    runs = [(float(t), s, w) for t in args.temperatures.split(",") for s, w in configs(args.configs)]
    if not torch.cuda.is_available():
        raise SystemExit("bench_sampling.py times a CUDA kernel: no CUDA device here")
    bandwidth = args.bandwidth or measured_rates(torch.device("cuda"))[1]
    results = [bench(args.rows, args.vocab, t, s, w, bandwidth) for t, s, w in runs]
    text = json.dumps(dict(bandwidth=bandwidth, results=results), indent=2)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_sampling.json").write_text(text + "\n")


if __name__ == "__main__":
    main()
