"""Decode attention over the paged KV cache, kernel by kernel: FlashInfer's decode kernel (CUDA
cores) against its tensor-core path (prefill kernels with one query a row, FA2 and FA3), at a batch
of rows whose cached lengths follow a workload, against the copy bandwidth (the floor: every cached
K and V byte read once).

    python tools/bench_attention.py --batch 2048 --lengths sharegpt   # lengths as sharegpt-like makes them
    python tools/bench_attention.py --batch 2048 --lengths 384        # every row 384 tokens
"""

from __future__ import annotations

import argparse

import numpy as np
import torch


def lengths(spec: str, batch: int, rng) -> np.ndarray:
    """sharegpt: a prompt of U[1, 512] tokens plus t of its U[1, 512] output tokens, t uniform below
    that (a running batch holds sequences at every point of their output); else one fixed length."""
    if spec == "sharegpt":
        out = rng.integers(1, 513, batch)
        return rng.integers(1, 513, batch) + (rng.random(batch) * out).astype(np.int64) + 1
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
    p.add_argument("--pool-gib", type=float, default=0.0,
                   help="pages drawn at random from a pool this large (a served cache holds ~4 GiB a layer)")
    args = p.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    kv_len = lengths(args.lengths, args.batch, np.random.default_rng(0))
    ps = args.page_size
    pages = (kv_len + ps - 1) // ps
    indptr = np.concatenate([[0], np.cumsum(pages)]).astype(np.int32)
    total = int(indptr[-1])
    last = ((kv_len - 1) % ps + 1).astype(np.int32)
    page_bytes = 2 * ps * args.kv_heads * args.head_dim * 2
    pool = max(total, int(args.pool_gib * 2**30 / page_bytes))
    kv = torch.empty(pool, 2, ps, args.kv_heads, args.head_dim, dtype=dt, device=dev).normal_()
    indices = torch.randperm(pool, device=dev)[:total].int()  # pages scattered as a long-running cache leaves them
    q = torch.randn(args.batch, args.heads, args.head_dim, dtype=dt, device=dev)
    heads = (args.heads, args.kv_heads, args.head_dim, ps)
    common = dict(q_data_type=dt, kv_data_type=dt)

    copy_src = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    copy_dst = torch.empty_like(copy_src)
    bandwidth = 2 * copy_src.numel() / time_ms(lambda: copy_dst.copy_(copy_src)) / 1e-3
    floor_ms = int(kv_len.sum()) * 2 * args.kv_heads * args.head_dim * 2 / bandwidth * 1e3

    ws = torch.empty(256 << 20, dtype=torch.uint8, device=dev)
    results = {}
    ref = None
    for name, make in [
        ("decode, CUDA cores", lambda: flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD")),
        ("decode, tensor cores (fa2)",
         lambda: flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=True, backend="fa2")),
        ("decode, tensor cores (fa3)",
         lambda: flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=True, backend="fa3")),
    ]:
        try:
            w = make()
            w.plan(torch.from_numpy(indptr), indices, torch.from_numpy(last), *heads, **common)
            out = w.run(q, kv)
            ms = time_ms(lambda w=w: w.run(q, kv))
        except Exception as e:  # a kernel this FlashInfer build lacks
            print(f"{name}: {type(e).__name__}: {str(e)[:200]}")
            continue
        ref = out if ref is None else ref
        results[name] = (ms, (out.float() - ref.float()).abs().max().item())
    print(f"batch {args.batch}, lengths {args.lengths} (mean {kv_len.mean():.0f}, max {kv_len.max()}), "
          f"heads {args.heads}/{args.kv_heads}x{args.head_dim}, page {ps}, pool {pool * page_bytes / 2**30:.1f} GiB: copy {bandwidth / 1e12:.2f} TB/s, "
          f"floor {floor_ms:.3f} ms a layer")
    for name, (ms, diff) in results.items():
        print(f"  {name:30s} {ms:7.3f} ms  {100 * floor_ms / ms:5.1f} % of floor  max |diff| {diff:.1e}")


def time_ms(fn, reps: int = 50) -> float:
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
