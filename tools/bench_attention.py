"""Decode attention over the paged KV cache, kernel by kernel: toka's Triton kernel
(workers/attention/triton_decode.py) and FlashInfer's decode kernel (CUDA cores) against its
tensor-core path (prefill kernels with one query a row, FA2 and FA3) and its XQA
kernel (TensorRT-LLM's decode kernel, with a Hopper path for FP8 pages), for each
page layout (NHD: a page's tokens outermost, as toka stores them; HND: its heads outermost) and
element type (bf16, fp8 e4m3), at a batch of rows whose cached lengths follow a workload, against
the copy bandwidth (the floor: every cached K and V byte read once).

The cache is laid out as a served one: --layers slabs of --cache-gib in all, each row's pages drawn
at random from the low pages of each slab (the allocator hands freed pages out again lowest first),
and one timed pass runs every layer in turn, as a step does.

    python tools/bench_attention.py --batch 2048 --lengths sharegpt   # lengths as sharegpt-like makes them
    python tools/bench_attention.py --batch 2048 --lengths 384        # every row 384 tokens
    python tools/bench_attention.py --lengths 1-256 --kernels triton --triton-configs 2:2:16,4:2:32,1:2:16:head

--triton-configs sweeps the Triton kernel's warps, pipeline stages and pages a work item (a chunk),
and optionally a cap on its registers a thread (more programs resident on an SM), `head` (the
kernel of a program per kv head), `lazy` (the accumulator rescaled only where the maximum grows by
more than LAZY_SLACK) and `pbN` (N pages loaded and multiplied at once), each a row of its own, so
that one run on a card finds the best setting for a workload's lengths.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch


def lengths(spec: str, batch: int, rng) -> np.ndarray:
    """sharegpt: a prompt of U[1, 512] tokens plus t of its U[1, 512] output tokens, t uniform below
    that (a running batch holds sequences at every point of their output); LO-HI: uniform in [LO, HI]
    (1-256: Hydragen's rows' own pages); else one fixed length."""
    if spec == "sharegpt":
        out = rng.integers(1, 513, batch)
        return rng.integers(1, 513, batch) + (rng.random(batch) * out).astype(np.int64) + 1
    if "-" in spec:
        lo, hi = (int(v) for v in spec.split("-"))
        return rng.integers(lo, hi + 1, batch)
    return np.full(batch, int(spec))


def main() -> None:
    import flashinfer

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--lengths", default="sharegpt")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--cache-gib", type=float, default=0.0,
                   help="the whole cache's size (default: just the pages the batch reads; a served one fills the card)")
    p.add_argument("--layouts", default="NHD,HND")
    p.add_argument("--kv-dtypes", default="bf16,fp8")
    p.add_argument("--kernels", default="triton,cuda-cores,fa2,xqa", help="of triton, cuda-cores, fa2, fa3, xqa")
    p.add_argument("--triton-configs", default="4:2:32",
                   help="the Triton kernel's settings to time, each WARPS:STAGES:CHUNK_PAGES[:MAX_REGISTERS] and "
                        "any of :head (a program per kv head), :lazy (lazy rescaling), :pbN (N pages a tile); "
                        "comma-separated")
    p.add_argument("--out", help="JSON of the results")
    args = p.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    kv_len = lengths(args.lengths, args.batch, np.random.default_rng(0))
    ps, kvh, d = args.page_size, args.kv_heads, args.head_dim
    pages = (kv_len + ps - 1) // ps
    indptr = np.concatenate([[0], np.cumsum(pages)]).astype(np.int32)
    total = int(indptr[-1])
    last = ((kv_len - 1) % ps + 1).astype(np.int32)
    q = torch.randn(args.batch, args.heads, d, dtype=dt, device=dev)
    heads = (args.heads, kvh, d, ps)
    bandwidth = copy_bandwidth(dev)
    kernels = {
        "cuda-cores": {},
        "fa2": dict(use_tensor_cores=True, backend="fa2"),
        "fa3": dict(use_tensor_cores=True, backend="fa3"),
    }
    types = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}
    ws = torch.empty(256 << 20, dtype=torch.uint8, device=dev)
    print(f"batch {args.batch}, lengths {args.lengths} (mean {kv_len.mean():.0f}, max {kv_len.max()}), "
          f"heads {args.heads}/{kvh}x{d}, page {ps}, {args.layers} layers: copy {bandwidth / 1e12:.2f} TB/s")
    results = []
    for kv_name in args.kv_dtypes.split(","):
        kv_dt = types[kv_name]
        page_bytes = 2 * ps * kvh * d * kv_dt.itemsize
        pool = max(total, int(args.cache_gib * 2**30 / page_bytes / args.layers))
        floor_ms = int(kv_len.sum()) * 2 * kvh * d * kv_dt.itemsize / bandwidth * 1e3
        for layout in args.layouts.split(","):
            shape = (args.layers, pool, 2, ps, kvh, d) if layout == "NHD" else (args.layers, pool, 2, kvh, ps, d)
            cache = torch.empty(shape, dtype=kv_dt, device=dev)
            for i in range(args.layers):  # only the pages read; the rest of a served cache is never touched
                cache[i, :total].copy_(torch.randn(cache[i, :total].shape, device=dev).to(kv_dt))
            indices = torch.randperm(total, device=dev).int()
            ref = None
            runs = [(k, c) for k in args.kernels.split(",") for c in (args.triton_configs.split(",") if k == "triton"
                                                                       else [None])]
            for kernel, config in runs:
                label = kernel if config is None else f"{kernel} {config}"
                try:
                    if kernel == "xqa":
                        run = xqa_decode(indptr, indices, kv_len, q, layout, ps, dev)
                    elif kernel == "triton":
                        if layout != "NHD":  # it reads toka's layout only
                            continue
                        run = triton_decode(pages, kv_len, indices, dev, **triton_settings(config))
                    else:
                        w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, layout, **kernels[kernel])
                        w.plan(torch.from_numpy(indptr), indices, torch.from_numpy(last), *heads,
                               q_data_type=dt, kv_data_type=kv_dt)
                        run = w.run
                    out = run(q, cache[0]).clone()  # xqa writes into one buffer that the timed layers overwrite
                    ms = time_ms(lambda run=run, c=cache: [run(q, layer) for layer in c]) / args.layers
                except Exception as e:  # a kernel this FlashInfer build lacks
                    print(f"  {kv_name} {layout} {label}: {type(e).__name__}: {str(e)[:200]}")
                    continue
                ref = out if ref is None else ref
                diff = (out.float() - ref.float()).abs().max().item()
                results.append(dict(kv=kv_name, layout=layout, kernel=label, ms_a_layer=ms, floor_ms=floor_ms,
                                    pct_of_floor=100 * floor_ms / ms, max_diff=diff))
                print(f"  {kv_name:4s} {layout} {label:10s} {ms:7.3f} ms a layer  {100 * floor_ms / ms:5.1f} % of "
                      f"floor ({floor_ms:.3f} ms, cache {cache.numel() * kv_dt.itemsize / 2**30:.1f} GiB)  "
                      f"max |diff| {diff:.1e}")
            del cache  # before the next cache of the card's size
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(bandwidth=bandwidth, batch=args.batch, lengths=args.lengths, results=results), f, indent=2)


def xqa_decode(indptr: np.ndarray, indices: torch.Tensor, kv_len: np.ndarray, q: torch.Tensor, layout: str,
               page_size: int, dev):
    """FlashInfer's XQA decode kernel (TensorRT-LLM's; on sm90 a Hopper kernel for FP8 pages) over the
    same rows: a dense page table a row, uint32 lengths, a zeroed workspace. Returns run(q, layer)."""
    from flashinfer.decode import xqa_batch_decode_with_kv_cache

    rows, width = len(kv_len), int(np.diff(indptr).max())
    table = np.zeros((rows, width), dtype=np.int32)
    flat = indices.cpu().numpy()
    for r in range(rows):
        table[r, : indptr[r + 1] - indptr[r]] = flat[indptr[r] : indptr[r + 1]]
    table = torch.from_numpy(table).to(dev)
    lens = torch.from_numpy(kv_len.astype(np.uint32)).to(dev)
    workspace = torch.zeros(256 << 20, dtype=torch.uint8, device=dev)
    out = torch.empty_like(q)
    scale = q.shape[-1] ** -0.5
    return lambda q, layer: xqa_batch_decode_with_kv_cache(q, layer, workspace, table, lens, width * page_size,
                                                           bmm1_scale=scale, out=out, kv_layout=layout)


def triton_settings(config: str) -> dict:
    """A --triton-configs entry, WARPS:STAGES:CHUNK_PAGES[:MAX_REGISTERS] then any of the words head,
    lazy and pbN, as triton_decode's keywords."""
    fields = config.split(":")
    numbers = [int(f) for f in fields if f.isdigit()]
    words = [f for f in fields if not f.isdigit()]
    settings = dict(zip(("warps", "stages", "chunk", "max_registers"), numbers),
                    per_kv_head="head" in words, lazy_rescale="lazy" in words)
    for word in words:
        if word.startswith("pb") and word[2:].isdigit():
            settings["pages_a_tile"] = int(word[2:])
        elif word not in ("head", "lazy"):
            raise ValueError(f"--triton-configs {config}: unknown setting {word!r} (head, lazy or pbN)")
    return settings


def triton_decode(pages: np.ndarray, kv_len: np.ndarray, indices: torch.Tensor, dev, warps: int | None = None,
                  stages: int | None = None, chunk: int | None = None, max_registers: int | None = None,
                  per_kv_head: bool = False, lazy_rescale: bool = False, pages_a_tile: int | None = None):
    """toka's Triton decode kernel over the same rows, with these settings (None: the engine's).
    Returns run(q, layer)."""
    from workers.attention.triton_decode import CHUNK_PAGES, PAGES_A_TILE, STAGES, WorkList, decode

    stages, chunk = stages or STAGES, chunk or CHUNK_PAGES
    work = WorkList.of(pages, kv_len, dev, chunk=chunk)
    return lambda q, layer: decode(q, layer, work, indices, num_warps=warps, num_stages=stages,
                                   max_registers=max_registers, per_kv_head=per_kv_head, lazy_rescale=lazy_rescale,
                                   pages_a_tile=pages_a_tile or PAGES_A_TILE)


def copy_bandwidth(dev) -> float:
    """Bytes read plus written per second by a 1 GiB device copy."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    return 2 * src.numel() / time_ms(lambda: dst.copy_(src)) / 1e-3


def time_ms(fn, reps: int = 20) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


if __name__ == "__main__":
    main()
