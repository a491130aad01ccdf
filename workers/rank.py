"""The process of one tensor-parallel rank: load the model, size the KV cache, then run every step
plan the scheduler publishes, in step order; rank 0 publishes each step's tokens."""

from __future__ import annotations

import logging
import os
import sys
import traceback

import torch
import zmq

from toka import protocol
from toka.config import EngineConfig
from toka.fabric import Channel, setup_logging, watch_parent

log = logging.getLogger("toka.rank")


def build(cfg: EngineConfig, rank: int):
    """Model, cache and runner for this rank; returns (runner, kv pages)."""
    from transformers import AutoConfig

    from workers.attention import make_backend
    from workers.kv_cache import KVCache
    from workers.layers.parallel import TPGroup
    from workers.models import model_class
    from workers.runner import ModelRunner
    from workers.weights import init_random, load_checkpoint

    device = torch.device(f"cuda:{rank}" if cfg.device == "cuda" else "cpu")
    if cfg.device == "cuda":
        torch.cuda.set_device(device)
    tp = TPGroup(rank, cfg.tp)
    if cfg.tp > 1:
        import torch.distributed as dist

        dist.init_process_group(
            "nccl" if cfg.device == "cuda" else "gloo",
            init_method=f"file://{os.path.join(cfg.run_dir, 'dist-init')}",
            rank=rank, world_size=cfg.tp, device_id=device if cfg.device == "cuda" else None,
        )
    hf = AutoConfig.from_pretrained(cfg.model)
    dtype = getattr(torch, cfg.dtype)
    torch.set_default_dtype(dtype)
    with torch.device(device):
        model = model_class(hf.model_type)(hf, tp)
    torch.set_default_dtype(torch.float32)
    if cfg.load_format == "random":
        init_random(model, cfg.seed)
    else:
        load_checkpoint(model, cfg.model)
    attn0 = model.model.layers[0].self_attn
    num_pages = cfg.kv_cache_tokens // cfg.page_size if cfg.kv_cache_tokens else _pages_from_memory(cfg, hf, attn0, dtype, device)
    cache = KVCache(hf.num_hidden_layers, num_pages, cfg.page_size, attn0.num_kv_heads, attn0.head_dim, dtype, device)
    backend = make_backend("flashinfer" if cfg.device == "cuda" else "torch", cache, attn0.num_heads, attn0.head_dim)
    runner = ModelRunner(model, backend, cfg.max_seqs, cfg.page_size, device)
    log.info("rank %d: %s on %s, %s, %d KV pages of %d tokens", rank, hf.model_type, device, cfg.dtype, num_pages, cfg.page_size)
    return runner, num_pages


def _pages_from_memory(cfg, hf, attn0, dtype, device) -> int:
    from workers.kv_cache import KVCache

    free, total = torch.cuda.mem_get_info(device)
    budget = free - (1 - cfg.gpu_memory_utilization) * total
    per_token = KVCache.bytes_per_token(hf.num_hidden_layers, attn0.num_kv_heads, attn0.head_dim, dtype)
    pages = int(budget // (per_token * cfg.page_size))
    if pages < 1:
        raise RuntimeError(f"no GPU memory is left for the KV cache ({free / 2**30:.1f} GiB free after loading)")
    log.info("KV cache: %.1f GiB free of %.1f GiB, using %.1f GiB = %d tokens", free / 2**30, total / 2**30,
             pages * cfg.page_size * per_token / 2**30, pages * cfg.page_size)
    return pages


def rank_main(cfg: EngineConfig, rank: int) -> None:
    watch_parent()
    name = f"rank{rank}"
    setup_logging(name, cfg.log_level)
    ctx = zmq.Context()
    control = Channel(ctx, zmq.PUSH, cfg.endpoint("control"), None, bind=False)
    try:
        runner, num_pages = build(cfg, rank)
        plans = Channel(ctx, zmq.SUB, cfg.endpoint("plans"), protocol.PlanMsg, bind=False)
        events = Channel(ctx, zmq.XPUB, cfg.endpoint("events"), None, bind=True) if rank == 0 else None
        control.send(protocol.Ready(name, {"kv_pages": num_pages}))
        serve(runner, plans, events)
    except Exception as e:
        log.error("%s failed: %s", name, traceback.format_exc())
        control.send(protocol.Fatal(name, f"{type(e).__name__}: {e}"))
        control.sock.close(linger=2000)
        sys.exit(1)
    log.info("%s stopped", name)


def serve(runner, plans: Channel, events: Channel | None) -> None:
    expected = 0
    if events is not None:
        events.wait_subscribers(2, timeout=600, name="events")  # scheduler and server
    while True:
        msg = plans.recv()
        if msg.step_id != expected:
            raise RuntimeError(f"step plans out of order: expected {expected}, got {msg.step_id}")
        expected += 1
        if isinstance(msg, protocol.Stop):
            return
        result = runner.step(msg)
        if events is not None:
            events.send(result)
