"""FP8 linear layers against bf16, kernel by kernel, at Llama-3.2-1B's shapes (CUDA, sm89 or later).

    python -m tools.bench_fp8 [--tokens 1,256,2048,4096] [--out DIR]

For each shape (qkv 2048 -> 3072, gate_up 2048 -> 16384, down 8192 -> 2048) and token count, the
device time of: bf16 F.linear; the FP8 path as the layers run it (the activations' quantization
kernel, then torch._scaled_mm); the quantization kernel alone; the FP8 matmul alone, also with
use_fast_accum, and with one scale for each whole operand instead of one a row (cuBLASLt's
tensorwise kernels). Each is the median of graph replays of many calls (so launch gaps, which
decode steps hide in CUDA graphs, do not count) that cycle through more weight copies than the L2
cache holds, as a model's layers do. Prints one JSON object and writes it to DIR/bench_fp8.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from workers.layers.fp8 import fp8_linear, quantize_rows, quantize_tokens

SHAPES = {"qkv": (2048, 3072), "gate_up": (2048, 16384), "down": (8192, 2048)}
CACHE_BYTES = 256 << 20  # weights cycled per measurement: several times the H200's 50 MB L2


def graph_us(calls, replays: int = 20) -> float:
    """Median device time of one call, over `replays` replays of a graph that makes every call once."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls[:2]:  # compiles and warms outside the capture
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(calls))
    return statistics.median(times)


def bench_shape(k: int, n: int, tokens: int) -> dict:
    copies = max(2, CACHE_BYTES // (2 * n * k))
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(tokens, k, generator=g, device="cuda").bfloat16()
    weights = [torch.randn(n, k, generator=g, device="cuda").mul_(k**-0.5).bfloat16() for _ in range(copies)]
    fp8 = [(q, s.view(-1)) for q, s in map(quantize_rows, weights)]
    xq, xs = quantize_tokens(x)
    one = torch.ones((), device="cuda")
    calls = {
        "bf16_us": [lambda w=w: F.linear(x, w) for w in weights],
        "fp8_us": [lambda q=q, s=s: fp8_linear(x, q, s) for q, s in fp8],
        "quantize_us": [lambda: quantize_tokens(x)] * copies,
        "fp8_matmul_us": [lambda q=q, s=s: torch._scaled_mm(xq, q.t(), scale_a=xs, scale_b=s.view(1, -1),
                                                           out_dtype=torch.bfloat16) for q, s in fp8],
        "fp8_matmul_fast_accum_us": [lambda q=q, s=s: torch._scaled_mm(
            xq, q.t(), scale_a=xs, scale_b=s.view(1, -1), out_dtype=torch.bfloat16, use_fast_accum=True)
            for q, s in fp8],
        # one scale for the whole of each operand (cuBLASLt's tensorwise FP8 kernels): what the rowwise
        # scaling the layers use costs against it
        "fp8_matmul_tensorwise_us": [lambda q=q: torch._scaled_mm(xq, q.t(), scale_a=one, scale_b=one,
                                                                 out_dtype=torch.bfloat16) for q, _ in fp8],
        "fp8_matmul_tensorwise_fast_accum_us": [lambda q=q: torch._scaled_mm(
            xq, q.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16, use_fast_accum=True) for q, _ in fp8],
    }
    row = {name: round(graph_us(fn), 2) for name, fn in calls.items()}
    flops = 2 * tokens * k * n
    row["bf16_tflops"] = round(flops / row["bf16_us"] / 1e6, 1)
    row["fp8_tflops"] = round(flops / row["fp8_us"] / 1e6, 1)
    row["speedup"] = round(row["bf16_us"] / row["fp8_us"], 2)
    ref = F.linear(x, weights[0]).float()
    row["rel_error"] = round(((fp8_linear(x, *fp8[0]).float() - ref).norm() / ref.norm()).item(), 4)
    return row


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="1,256,2048,4096", help="token counts, comma-separated")
    p.add_argument("--out", type=Path, default=None, help="folder for bench_fp8.json")
    args = p.parse_args(argv)
    results = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "shapes": {f"{name} {k}x{n}": {str(t): bench_shape(k, n, t) for t in map(int, args.tokens.split(","))}
                   for name, (k, n) in SHAPES.items()},
    }
    text = json.dumps(results, indent=2)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_fp8.json").write_text(text + "\n")


if __name__ == "__main__":
    main()
