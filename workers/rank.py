"""The process of one rank (a tensor-parallel shard of one pipeline stage): load the stage's part of
the model, size its KV cache, then run every step plan the scheduler publishes, in step order; the
last stage's rank 0 publishes each step's tokens."""

from __future__ import annotations

import logging
import os
import sys
import time
import traceback

import torch
import zmq

from toka import protocol
from toka.arith import cdiv
from toka.cluster import rank_channels, rendezvous
from toka.config import EngineConfig
from toka.fabric import Channel, leave_stop_signals_to_launcher, run_measured, setup_logging, watch_parent
from workers.step_trace import StepTrace

log = logging.getLogger("toka.rank")


def build(cfg: EngineConfig, rank: int, pipe=None):
    """Model, cache and runner for rank `rank` of the replica (stage rank // tp, tensor-parallel
    index rank % tp); returns (runner, kv pages). `pipe`: links the caller made between stages that
    share this process and its first device (tests), instead of torch.distributed's."""
    from transformers import AutoConfig

    from workers.attention import make_backend
    from workers.kv_cache import KVCache
    from workers.layers.parallel import PipelineStage, TPGroup
    from workers.models import model_class
    from workers.pipeline import Pipe, tp_group
    from workers.quant import use_fp8
    from workers.runner import ModelRunner
    from workers.weights import init_random, load_checkpoint

    gpu = cfg.gpu(rank if pipe is None else 0)
    device = torch.device(f"cuda:{gpu}" if cfg.device == "cuda" else "cpu")
    if cfg.device == "cuda":
        torch.cuda.set_device(device)
        check_capability(cfg, device)
    hf = AutoConfig.from_pretrained(cfg.model)
    stage = PipelineStage.of(hf.num_hidden_layers, rank // cfg.tp, cfg.pp)
    if cfg.device == "cpu":  # ranks share the cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // cfg.ranks_per_node))
    group = None
    if cfg.tp * cfg.pp > 1 and pipe is None:
        import torch.distributed as dist

        dist.init_process_group(
            "nccl" if cfg.device == "cuda" else "gloo", **rendezvous(cfg),
            rank=rank, world_size=cfg.tp * cfg.pp, device_id=device if cfg.device == "cuda" else None,
        )
        group = tp_group(stage, cfg.tp)  # every rank makes the groups in one order: these first
        pipe = Pipe.connect(stage, rank % cfg.tp, cfg.tp) if cfg.pp > 1 else None
    tp = TPGroup(rank % cfg.tp, cfg.tp, group)
    dtype = getattr(torch, cfg.dtype)
    torch.set_default_dtype(dtype)
    with torch.device(device):
        model = model_class(hf.model_type)(hf, tp, stage)
    torch.set_default_dtype(torch.float32)
    quantization_config = getattr(hf, "quantization_config", None)
    if cfg.load_format == "random":
        init_random(model, cfg.seed)
        if cfg.quantization == "fp8":
            use_fp8(model, quantization_config, quantize_held=True)
    else:
        if cfg.quantization == "fp8":  # before loading: each tensor is quantized, or copied, as it loads
            use_fp8(model, quantization_config)
        load_checkpoint(model, cfg.model)
    attn0 = next(iter(model.model.layers.values())).self_attn
    shape = (len(stage.layers), attn0.num_kv_heads, attn0.head_dim)
    # an FP8 cache's scales per layer: the checkpoint's where it gives them, else 1.0
    kv_scales = [(layer.self_attn.k_scale, layer.self_attn.v_scale)
                 for layer in model.model.layers.values()]
    backend_name = "flashinfer" if cfg.device == "cuda" else "torch"
    kernel = decode_kernel(cfg, attn0.num_kv_heads, attn0.head_dim)

    def make_runner(num_pages: int) -> ModelRunner:
        # one page more than the scheduler hands out: the scratch page of CUDA-graph padding rows
        cache = KVCache(shape[0], num_pages + 1, cfg.page_size, shape[1], shape[2], cfg.kv_dtype, device,
                        scales=kv_scales)
        backend = make_backend(backend_name, cache, attn0.num_heads, attn0.head_dim,
                               decode_kernel=kernel, dtype=dtype)
        max_pages_per_seq = min(cdiv(cfg.max_model_len, cfg.page_size), num_pages)
        return ModelRunner(model, backend, cfg.max_seqs, cfg.page_size, device, scratch_page=num_pages,
                           max_pages_per_seq=max_pages_per_seq, raw_logprobs=cfg.logprobs_mode == "raw", pipe=pipe)

    if cfg.kv_cache_tokens:
        num_pages = cfg.kv_cache_tokens // cfg.page_size
        # fail now with a clear message, not in an allocation that swaps or gets OOM-killed
        need = num_pages * cfg.page_size * KVCache.bytes_per_token(*shape, cfg.kv_dtype)
        free = torch.cuda.mem_get_info(device)[0] if cfg.device == "cuda" else \
            int(next(line.split()[1] for line in open("/proc/meminfo") if line.startswith("MemAvailable"))) * 1024
        if need > free:
            raise RuntimeError(f"a KV cache of {cfg.kv_cache_tokens} tokens needs {need / 2**30:.1f} GiB but "
                               f"{free / 2**30:.1f} GiB is free on {device}; lower --kv-cache-tokens")
    else:
        num_pages = _pages_from_memory(cfg, make_runner, KVCache.bytes_per_token(*shape, cfg.kv_dtype), device)
    runner = make_runner(num_pages)
    warm_up(runner, cfg, hf.vocab_size, num_pages)
    if cfg.device == "cuda" and cfg.cuda_graphs:
        sizes = graph_sizes(min(cfg.cuda_graph_max_batch, cfg.max_seqs))
        runner.capture_graphs(sizes, min_group=cfg.hydragen_min_group if cfg.hydragen else 0)
        log.info("captured CUDA graphs for decode batches %s%s", sizes,
                 f", and with Hydragen groups for those of {cfg.hydragen_min_group} rows or more" if cfg.hydragen else "")
        if pieces_wanted(cfg):
            sizes = piece_sizes(cfg.max_tokens_per_forward)
            runner.capture_pieces(sizes)
            log.info("captured other steps in pieces between attention calls for %d token counts up to %d",
                     len(sizes), sizes[-1])
    layers = f", stage {stage.index} of {stage.count}: layers {stage.layers.start}-{stage.layers.stop - 1}" \
        if stage.count > 1 else ""
    log.info("rank %d: %s on %s, %s, %d KV pages of %d tokens (%s)%s%s", rank, hf.model_type, device, cfg.dtype,
             num_pages, cfg.page_size, str(cfg.kv_dtype).removeprefix("torch."), layers,
             f", {kernel} decode attention" if cfg.device == "cuda" else "")
    return runner, num_pages


def decode_kernel(cfg: EngineConfig, kv_heads: int, head_dim: int) -> str:
    """--decode-attention's kernel for this model's shape (kv heads of this rank): auto is toka's
    Triton kernel where it builds for it, over bf16 and FP8 pages alike, else FlashInfer's CUDA-core
    kernel. Over FP8 pages the Triton kernel multiplies in float16 (e4m3 exactly, probabilities to 11
    bits), which keeps the logprob bar on both measured shapes (docs/fp8.md)."""
    from workers.attention import triton_decode

    # its tensor-core products take 16-bit queries (float32 ones would round to tf32)
    fits = triton_decode.supports(kv_heads, head_dim, cfg.page_size) and cfg.dtype in ("bfloat16", "float16")
    if cfg.decode_attention == "auto":
        return "triton" if fits else "cuda-cores"
    if cfg.decode_attention == "triton" and not fits:
        raise RuntimeError(f"--decode-attention triton needs Triton, a 16-bit --dtype and powers of two for the kv "
                           f"heads, head size (16 or more) and page size; this rank has {kv_heads} kv heads of size "
                           f"{head_dim} on pages of {cfg.page_size} tokens in {cfg.dtype}: choose "
                           f"--decode-attention cuda-cores")
    return cfg.decode_attention


def check_capability(cfg: EngineConfig, device: torch.device) -> None:
    """FP8 cache and matmuls need FP8 tensor cores: Ada (sm89), Hopper (sm90) and later. XQA is
    built for sm90, sm100 and sm120."""
    asked = [name for name, on in (("--kv-cache-dtype fp8_e4m3", cfg.kv_cache_dtype == "fp8_e4m3"),
                                   ("--quantization fp8", cfg.quantization == "fp8")) if on]
    if not asked and cfg.decode_attention != "xqa":
        return
    cap = torch.cuda.get_device_capability(device)
    if asked and cap < (8, 9):
        raise RuntimeError(f"{' and '.join(asked)} need FP8 tensor cores (compute capability 8.9 or later); "
                           f"{torch.cuda.get_device_name(device)} on {device} has {cap[0]}.{cap[1]}")
    if cfg.decode_attention == "xqa" and cap[0] not in (9, 10, 12):
        raise RuntimeError(f"--decode-attention xqa runs on sm90, sm100 and sm120 GPUs; "
                           f"{torch.cuda.get_device_name(device)} on {device} has {cap[0]}.{cap[1]}")


def pieces_wanted(cfg: EngineConfig) -> bool:
    return cfg.device == "cuda" and cfg.cuda_graphs and cfg.piecewise_graphs and cfg.pp == 1


def piece_sizes(largest: int, step: int = 128) -> list[int]:
    # 128 tokens of padding at most: ~3 % of a mixed step of 4,000 tokens, under 1.5 % on average
    return sorted(set(range(step, largest + 1, step)) | {largest})


def graph_sizes(largest: int) -> list[int]:
    # fine steps where padding costs most, coarser above (each size is one capture at start-up)
    sizes = [1, 2, 4, 8] + list(range(16, 257, 16)) + list(range(320, largest + 1, 64))
    return sorted({s for s in sizes if s <= largest} | {largest})


def warm_up(runner, cfg: EngineConfig, vocab: int, num_pages: int) -> None:
    """Runs the largest steps the scheduler may plan: a full prefill budget, then a decode of
    max_seqs rows sampling with top-p/top-k and the most logprobs. Whatever memory they need
    is thereby known to fit before READY."""
    from toka.protocol import SeqParams, StepPlan

    ps = cfg.page_size
    budget = min(cfg.max_tokens_per_forward, num_pages * ps, cfg.max_model_len)
    pages = cdiv(budget, ps)
    tokens = [i % vocab for i in range(budget)]
    admit = [SeqParams(slot=0, top_p=0.9, top_k=50, logprobs=20)]
    runner.step(StepPlan(step_id=-1, rids=[0], slots=[0], q_lens=[budget], kv_lens=[budget], emit=[True],
                         num_prefill=1, prefill_tokens=tokens, table_slots=[0] * pages, table_cols=list(range(pages)),
                         table_pages=list(range(pages)), admit=admit))
    rows = min(cfg.max_seqs, num_pages, cfg.max_tokens_per_forward)
    # a few rows with every logits-processor option: their path's buffers count in the peak
    processed = dict(repetition_penalty=1.1, frequency_penalty=0.1, min_p=0.05, logit_bias={0: 1.0}, min_tokens=2,
                     stop_token_ids=[1], history=[0, 1], prompt_len=1)
    admit = [SeqParams(slot=r, top_p=0.9, top_k=50, logprobs=20, **(processed if r < 8 else {})) for r in range(rows)]
    plan = StepPlan(step_id=-1, rids=list(range(rows)), slots=list(range(rows)), q_lens=[1] * rows, kv_lens=[1] * rows,
                    emit=[True] * rows, num_prefill=0, prefill_tokens=[], table_slots=list(range(rows)),
                    table_cols=[0] * rows, table_pages=list(range(rows)), admit=admit)
    runner.step(plan)
    if cfg.device == "cuda":
        torch.cuda.synchronize()


def _pages_from_memory(cfg, make_runner, bytes_per_token: int, device) -> int:
    """KV pages that fit in gpu_memory_utilization of the card after the weights and the peak of
    a warm-up at the largest batch (measured with a small cache)."""
    probe_pages = cdiv(cfg.max_tokens_per_forward, cfg.page_size) + cfg.max_seqs
    torch.cuda.reset_peak_memory_stats(device)
    probe = make_runner(probe_pages)
    base = torch.cuda.memory_allocated(device)
    warm_up(probe, cfg, probe.model.config.vocab_size, probe_pages)
    peak = torch.cuda.max_memory_allocated(device)
    probe_cache = probe.attn.cache.data.numel() * probe.attn.cache.data.element_size()
    # the pieces' graphs keep their own copy of the largest step's activations (their memory pool)
    pieces = peak - base if pieces_wanted(cfg) else 0
    del probe
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    # CUDA graphs and their buffers (by count, ~1.2 GiB for the 92 captures up to 2,048 rows with and
    # without Hydragen groups: a FlashInfer wrapper each, 8 MiB of plan space apiece, page lists and
    # the graphs' activations), workspaces, allocator slack
    reserve = 2 << 30
    others = total - free - torch.cuda.memory_reserved(device)  # CUDA context, other processes
    budget = total * cfg.gpu_memory_utilization - (peak - probe_cache) - reserve - pieces - others
    pages = int(budget // (bytes_per_token * cfg.page_size))
    if pages < 1:
        raise RuntimeError(
            f"the KV cache does not fit: peak {peak / 2**30:.1f} GiB for weights and activations of "
            f"{total / 2**30:.1f} GiB; lower --max-tokens-per-forward/--max-seqs or raise --gpu-memory-utilization")
    log.info(
        "KV cache: %d tokens (%.1f GiB) = %.2f x %.1f GiB card - %.1f GiB peak of weights and warm-up "
        "activations - 2 GiB reserve - %.1f GiB for the pieces' graphs", pages * cfg.page_size,
        pages * cfg.page_size * bytes_per_token / 2**30, cfg.gpu_memory_utilization, total / 2**30,
        (peak - probe_cache) / 2**30, pieces / 2**30)
    return pages


def rank_main(cfg: EngineConfig, rank: int) -> None:
    leave_stop_signals_to_launcher()
    watch_parent()
    name = cfg.process_name(f"rank{rank}")
    setup_logging(name, cfg.log_level)
    ctx = zmq.Context()
    control = Channel(ctx, zmq.PUSH, cfg.endpoint("control"), None, bind=False)
    try:
        runner, num_pages = build(cfg, rank)
        plans, events, endpoints = rank_channels(ctx, cfg, rank)
        control.send(protocol.Ready(name, {"kv_pages": num_pages}, endpoints))
        run_measured(name, lambda: serve(runner, plans, events, StepTrace(name)))
    except Exception as e:
        log.error("%s failed: %s", name, traceback.format_exc())
        control.send(protocol.Fatal(name, f"{type(e).__name__}: {e}"))
        control.sock.close(linger=2000)
        sys.exit(1)
    log.info("%s stopped", name)


def serve(runner, plans: Channel, events: Channel | None, trace: StepTrace | None = None) -> dict:
    """Runs plans in step order. Step N + 1 is launched before step N's tokens are copied out when
    its plan arrives while the device still runs step N, so the device does not wait for the host
    between them; step N is finished as soon as the device is done with it if no plan came first
    (the scheduler may need its tokens to plan more). The wait between the two spins: a timed poll
    would add up to its timeout to every step's round trip through the scheduler.

    Returns (and logs at the stop) the host seconds spent launching; the seconds the device idled
    with every step finished before the next plan came (waiting for the scheduler, or for requests);
    and, over the steps whose plan came while the one before was still in flight, the device's time
    from that one's end to the step's forward (`runner.device_wait`: the step's input copies, and
    whatever the host took to enqueue them late), which is what a host slower than the device costs."""
    expected = 0
    pending, pending_behind = None, False  # the step in flight; whether its plan came while another was
    launching = idle = host_wait = 0.0
    first = last = 0.0  # when the first and the latest plan arrived

    def publish(launched, behind: bool) -> None:
        nonlocal host_wait
        if launched is None:
            return
        result = runner.finish(launched)
        if events is not None:
            events.send(result)
        if behind:
            host_wait += runner.device_wait(launched)

    if events is not None:
        events.wait_subscribers(2, timeout=600, name="events")  # scheduler and server
    while True:
        while pending is not None and not plans.poll(0):
            if runner.done(pending):
                publish(pending, pending_behind)
                pending = None
        t0 = time.perf_counter()
        msg = plans.recv()
        t1 = time.perf_counter()
        if msg.step_id != expected:
            raise RuntimeError(f"step plans out of order: expected {expected}, got {msg.step_id}")
        if isinstance(msg, protocol.Stop):
            publish(pending, pending_behind)
            runner.close()
            if trace is not None:
                trace.close()
            if expected:
                log.info("%d steps in %.1f s from the first plan to the last: launching %.2f ms a step; device idle "
                         "waiting for plans %.2f ms a step (%.1f s in all); from a step's end to the next one's "
                         "forward %.2f ms a step (%.1f s in all)", expected, last - first, launching / expected * 1e3,
                         idle / expected * 1e3, idle, host_wait / expected * 1e3, host_wait)
            return dict(steps=expected, span_s=last - first, launching_s=launching, idle_s=idle, host_wait_s=host_wait)
        behind = pending is not None  # the last step may still be running: any wait before this one is the host's
        if not behind and expected:  # nothing left on the device: it waited for this plan
            idle += t1 - t0  # (or for requests, between busy periods)
        first, last = first or t1, t1
        expected += 1
        if trace is not None:
            trace.before_launch(msg)
        launched = runner.launch(msg)
        launching += time.perf_counter() - t1
        publish(pending, pending_behind)
        pending, pending_behind = launched, behind
