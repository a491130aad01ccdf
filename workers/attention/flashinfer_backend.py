"""FlashInfer attention over the paged KV cache (CUDA).

Per step, `plan()` runs FlashInfer's planners once (on host metadata, outside the layers and
outside CUDA graphs); every layer then appends its new K/V into the cache and runs the prefill
rows through the paged prefill wrapper and the decode rows through the `decode_kernel`: toka's
Triton kernel (workers/attention/triton_decode.py: at ~90 % of the copy bandwidth on bf16 pages
where FlashInfer's CUDA-core kernel reaches ~65 %), FlashInfer's decode kernel on CUDA cores, its
FA2 tensor-core path, or XQA (TensorRT-LLM's decode kernel: on Hopper it reads FP8 pages at 2.6x
the CUDA-core kernel's speed, and bf16 ones slower; tools/bench_attention.py). XQA gives no
log-sum-exp, so Hydragen steps decode their rows' own pages with the CUDA-core kernel.

CUDA graphs: a decode-only step of `bs` rows can run inside a captured graph. Each captured size
has fixed buffers for the append's page lists and the decode kernel's inputs (the Triton
kernel's work list, XQA's table, or a decode wrapper in FlashInfer's use_cuda_graph mode);
`plan()` refills them before a replay.
A size captured with Hydragen groups also has a prefix wrapper of `groups + 1` fixed entries:
the step's groups, empty ones after them, and a last one holding every row in no group, so the
planner always sees the same number of groups and of query rows (its tile sizes and work lists
then fit the captured kernels); the merge skips the rows of that last entry by a mask.
"""

from __future__ import annotations

import flashinfer
import numpy as np
import torch

from workers.attention import AttentionBackend, AttentionBatch, cumsum0
from workers.attention.triton_decode import WorkList, sm_count
from workers.attention.triton_decode import decode as triton_decode
from workers.staging import RING

WORKSPACE_BYTES = 256 * 1024 * 1024


def graph_prefix_workspace_bytes(rows: int, entries: int, qo_heads: int, kv_heads: int, head_dim: int,
                                 num_sm: int) -> int:
    """The float workspace a captured prefix plan of `rows` queries over `entries` page lists may
    take when FlashInfer's FA2 prefill splits the keys (its path over an FP8 cache, and on cards before
    sm90; FA3's plans need no float workspace, so there the size is spare): in a graph it
    sizes the split outputs for the most query tiles the rows can make (their packed rows, a tile of
    up to 128 more an entry) or for its split grid (two CTAs an SM over the kv heads), whichever is
    more, and keeps a float a head and dimension (and one for the log-sum-exp) per tile row."""
    tile = 128
    tile_rows = max(2 * num_sm // kv_heads * tile, rows * (qo_heads // kv_heads) + entries * tile)
    return qo_heads * tile_rows * (head_dim + 1) * 4 + (1 << 20)  # + alignment


def _decode_args(kernel: str) -> dict:
    # FlashInfer's tensor-core decode runs its FA2 prefill kernel with one query a row; its FA3 one
    # reads the cache at a seventh of the copy bandwidth there (tools/bench_attention.py)
    return dict(use_tensor_cores=True, backend="fa2") if kernel == "tensor-cores" else {}


class _Xqa:
    """XQA's inputs for the decode rows of a step: a dense page table a row (the runner's table's
    rows, as many columns as the longest row needs, or all of them in a graph) and uint32 lengths."""

    def __init__(self, device, head_dim: int):
        self.workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=device)  # its semaphores start at 0
        self.sm_scale = head_dim**-0.5
        self.table: torch.Tensor | None = None  # the planned step's
        self.lens: torch.Tensor | None = None
        self.graph_table: torch.Tensor | None = None  # the graph sizes' table (the largest's rows; one at a time)

    def plan(self, batch: AttentionBatch, graph_lens: torch.Tensor | None = None) -> None:
        n_pre = batch.num_prefill
        slots = batch.slots[n_pre:]
        if graph_lens is None:
            width = int(np.diff(batch.page_indptr_host[n_pre:]).max())
            self.table = batch.page_table[slots, :width]
            self.lens = batch.kv_lens[n_pre:].view(torch.uint32)
            return
        if self.graph_table is None:  # sizes are added largest first
            self.graph_table = torch.zeros(len(slots), batch.page_table.shape[1], dtype=torch.int32, device=slots.device)
        self.table = self.graph_table[: len(slots)]
        torch.index_select(batch.page_table, 0, slots, out=self.table)
        graph_lens.copy_(batch.kv_lens)
        self.lens = graph_lens.view(torch.uint32)

    def run(self, q, kv, k_scale: float, v_scale: float, out: torch.Tensor | None = None):
        # q is a view of the fused projection's output; XQA reads its rows packed
        return flashinfer.decode.xqa_batch_decode_with_kv_cache(
            q.contiguous(), kv, self.workspace, self.table, self.lens, self.table.shape[1] * kv.shape[2],
            bmm1_scale=self.sm_scale * k_scale, bmm2_scale=v_scale, out=out)


class _GraphSlot:
    """Fixed buffers of one captured decode batch size."""

    def __init__(self, bs: int, max_pages: int, device, workspace, decode_kernel: str):
        i32 = dict(dtype=torch.int32, device=device)
        # the Triton kernel's work list: at most an item a row and one more a chunk of the pages
        self.work = WorkList(bs, WorkList.bound_for(bs, max_pages), device) if decode_kernel == "triton" else None
        self.indptr = torch.zeros(bs + 1, **i32)
        self.indices = torch.zeros(max_pages, **i32)
        self.last_len = torch.ones(bs, **i32)
        self.rows = torch.arange(bs, **i32)
        self.positions = torch.zeros(bs, **i32)
        # the Triton kernel reads the buffers above itself; FlashInfer's wrapper (its plan space ~8 MiB)
        # serves the other kernels, and XQA's Hydragen steps
        self.wrapper = None if decode_kernel == "triton" else flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            workspace, "NHD", use_cuda_graph=True, paged_kv_indptr_buffer=self.indptr,
            paged_kv_indices_buffer=self.indices, paged_kv_last_page_len_buffer=self.last_len,
            **_decode_args(decode_kernel),
        )
        self.lens = torch.ones(bs, **i32)  # XQA's
        self.prefix: _PrefixSlot | None = None  # with Hydragen groups


class _PrefixSlot:
    """Fixed buffers of a captured size's Hydragen prefix attention: `groups` groups and the entry
    of the rows in none."""

    def __init__(self, bs: int, groups: int, max_pages: int, page_size: int, device, workspace):
        i32 = dict(dtype=torch.int32, device=device)
        self.groups = groups
        self.qo_indptr = torch.zeros(groups + 2, **i32)
        self.indptr = torch.zeros(groups + 2, **i32)
        self.indices = torch.zeros(max_pages, **i32)
        self.last_len = torch.full((groups + 1,), page_size, **i32)
        self.grouped = torch.zeros(bs, dtype=torch.bool, device=device)  # the rows merged with a prefix
        self.wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(
            workspace, "NHD", use_cuda_graph=True, qo_indptr_buf=self.qo_indptr, paged_kv_indptr_buf=self.indptr,
            paged_kv_indices_buf=self.indices, paged_kv_last_page_len_buf=self.last_len,
        )


class FlashInferAttention(AttentionBackend):
    def __init__(self, cache, num_heads: int, head_dim: int, decode_kernel: str = "cuda-cores",
                 dtype: torch.dtype | None = None):
        self.cache = cache
        self.decode_kernel = decode_kernel
        self.num_heads = num_heads
        self.num_kv_heads = cache.layers[0].shape[3]
        self.head_dim = head_dim
        device = cache.data.device
        self.dtype = dtype or cache.data.dtype  # of queries and outputs (the model's, also over an FP8 cache)
        self.kv_dtype = cache.data.dtype
        self.prefill_ws = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self.decode_ws = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self.prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(self.prefill_ws, "NHD")
        self.decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(self.decode_ws, "NHD",
                                                                  **_decode_args(decode_kernel))
        self.xqa = _Xqa(device, head_dim) if decode_kernel == "xqa" else None
        # the Triton kernel's planned work (eager: the step's; in a graph: the slot's) and the page
        # list its offsets index
        self.work: WorkList | None = None
        self.work_pages: torch.Tensor | None = None
        # Hydragen: each group's queries against its shared pages, a non-causal prefill-shaped problem
        # (a group's many queries share each key read); runs after `prefill` in the same stream
        self.prefix = flashinfer.BatchPrefillWithPagedKVCacheWrapper(self.prefill_ws, "NHD")
        self.grouped = 0  # decode rows in Hydragen groups this step
        self.graph_slots: dict[int, _GraphSlot] = {}
        # the graphs' prefix plans' where they need more than prefill_ws (add_graph_size makes it)
        self.prefix_ws: torch.Tensor | None = None
        self.graph: _GraphSlot | None = None  # the planned step's graph buffers, or None when eager
        self.graph_grouped = False  # whether that graph step has Hydragen groups
        # the planned step's append_paged_kv_cache arguments (rows, positions, page indices, indptr,
        # last page lengths) and how many of its tokens are prefill tokens (plan() sets them)
        self.append_args: tuple = ()
        self.num_prefill_tokens = 0
        self._planned: dict[int, torch.cuda.Event] = {}  # id(wrapper) -> recorded after its last plan

    def add_graph_size(self, bs: int, max_pages: int, groups: int = 0) -> None:
        device = self.cache.data.device
        slot = self.graph_slots.get(bs) or _GraphSlot(bs, max_pages, device, self.decode_ws, self.decode_kernel)
        if groups:
            need = graph_prefix_workspace_bytes(bs, groups + 1, self.num_heads, self.num_kv_heads, self.head_dim,
                                                sm_count(device))
            # one buffer for every size that needs more than the shared one: made at the first such size
            # (the runner captures the largest first) and again only for a larger one
            if need > WORKSPACE_BYTES and (self.prefix_ws is None or self.prefix_ws.numel() < need):
                self.prefix_ws = torch.empty(need, dtype=torch.uint8, device=device)
            workspace = self.prefix_ws if need > WORKSPACE_BYTES else self.prefill_ws
            slot.prefix = _PrefixSlot(bs, groups, max_pages, self.cache.page_size, device, workspace)
        self.graph_slots[bs] = slot

    def plan(self, batch: AttentionBatch, graph_size: int | None = None) -> None:
        n_pre = batch.num_prefill
        common = dict(q_data_type=self.dtype, kv_data_type=self.kv_dtype)
        heads = (self.num_heads, self.num_kv_heads, self.head_dim, self.cache.page_size)
        indptr, last_len = batch.page_indptr_host, batch.last_page_len_host
        if graph_size is not None:
            slot = self.graph = self.graph_slots[graph_size]
            g = batch.groups
            self.graph_grouped = g is not None
            self.work = slot.work
            self.work_pages = slot.indices
            if g is None and self.decode_kernel in ("xqa", "triton"):
                slot.positions.copy_(batch.positions)
                # the append's page lists, which the decode wrapper's plan fills otherwise
                slot.indptr.copy_(batch.page_indptr)
                slot.indices[: len(batch.page_indices)].copy_(batch.page_indices)
                slot.last_len.copy_(batch.last_page_len)
                if self.xqa is not None:
                    self.xqa.plan(batch, graph_lens=slot.lens)
                else:
                    WorkList.of(np.diff(indptr), batch.kv_lens_host, into=slot.work)
            elif g is None:
                slot.positions.copy_(batch.positions)
                self._plan(slot.wrapper, _pinned(indptr), batch.page_indices, _pinned(last_len), *heads, **common)
            else:
                self._plan_graph_groups(slot, batch, heads, common)
            # the graph reads these fixed buffers, which plan() just refilled
            self.append_args = (slot.rows, slot.positions, slot.indices, slot.indptr, slot.last_len)
            self.num_prefill_tokens = 0
            return
        self.graph = None
        self.work = None
        self.append_args = (batch.token_rows, batch.positions.to(torch.int32), batch.page_indices,
                            batch.page_indptr, batch.last_page_len)
        self.num_prefill_tokens = int(batch.qo_indptr_host[n_pre])
        if n_pre:
            self._plan(self.prefill, _pinned(batch.qo_indptr_host[: n_pre + 1]), _pinned(indptr[: n_pre + 1]),
                       batch.page_indices[: indptr[n_pre]], _pinned(last_len[:n_pre]), *heads, causal=True, **common)
        g = batch.groups
        self.grouped = int(g.rows_host.sum()) if g is not None else 0
        if g is not None:
            full = np.full(len(g.rows_host), self.cache.page_size)
            self._plan(self.prefix, _pinned(cumsum0(g.rows_host)), _pinned(g.prefix_indptr_host), g.prefix_indices,
                       _pinned(full), *heads, causal=False, **common)
            if self.decode_kernel == "triton":
                own_lens = batch.kv_lens_host[n_pre:] - g.suffix_start_host * self.cache.page_size
                self.work = WorkList.of(np.diff(g.suffix_indptr_host), own_lens, self.cache.data.device)
                self.work_pages = g.suffix_indices
            else:
                self._plan(self.decode, _pinned(g.suffix_indptr_host), g.suffix_indices, _pinned(last_len[n_pre:]),
                           *heads, **common)
        elif n_pre < len(last_len) and self.decode_kernel == "triton":
            self.work = WorkList.of(np.diff(indptr[n_pre:]), batch.kv_lens_host[n_pre:], self.cache.data.device)
            self.work_pages = batch.page_indices[indptr[n_pre] :]
        elif n_pre < len(last_len) and self.xqa is not None:
            self.xqa.plan(batch)
        elif n_pre < len(last_len):
            base = indptr[n_pre]
            self._plan(self.decode, _pinned(indptr[n_pre:] - base), batch.page_indices[base:],
                       _pinned(last_len[n_pre:]), *heads, **common)

    def _plan_graph_groups(self, slot: _GraphSlot, batch: AttentionBatch, heads: tuple, common: dict) -> None:
        """A grouped step into a slot's fixed buffers. The decode wrapper holds each row's own pages,
        so the append writes at positions counted from a row's first own page."""
        g, p, ps = batch.groups, slot.prefix, self.cache.page_size
        real, bs = len(g.rows_host), len(batch.kv_lens_host)
        if real > p.groups:
            raise ValueError(f"{real} Hydragen groups in a step of {bs} rows; its graph holds {p.groups}")
        rows = np.zeros(p.groups + 1, dtype=np.int64)
        rows[:real] = g.rows_host
        rows[-1] = bs - g.rows_host.sum()
        # empty groups and the last entry read the first group's first page (never written)
        pages = np.ones(p.groups + 1, dtype=np.int64)
        pages[:real] = np.diff(g.prefix_indptr_host)
        filler = g.prefix_indices[:1].expand(p.groups + 1 - real)
        self._plan(p.wrapper, _pinned(cumsum0(rows)), _pinned(cumsum0(pages)),
                   torch.cat([g.prefix_indices, filler]), _pinned(np.full(p.groups + 1, ps)), *heads,
                   causal=False, **common)
        own_positions = batch.kv_lens_host - 1 - g.suffix_start_host * ps
        if slot.work is not None:  # the Triton kernel reads the append's page lists
            slot.indptr.copy_(_pinned(g.suffix_indptr_host), non_blocking=True)
            slot.indices[: len(g.suffix_indices)].copy_(g.suffix_indices)
            slot.last_len.copy_(batch.last_page_len)
            WorkList.of(np.diff(g.suffix_indptr_host), own_positions + 1, into=slot.work)
        else:
            self._plan(slot.wrapper, _pinned(g.suffix_indptr_host), g.suffix_indices,
                       _pinned(batch.last_page_len_host), *heads, **common)
        slot.positions.copy_(_pinned(own_positions), non_blocking=True)
        slot.prefix.grouped.copy_(RING.host(np.arange(bs) < rows[:real].sum()), non_blocking=True)

    def _plan(self, wrapper, *args, **kwargs) -> None:
        # A wrapper's plan() fills its pinned buffer and enqueues a copy from it to the device. The
        # host runs a step ahead of the device, so before refilling that buffer wait until the copy
        # of the wrapper's previous plan has run (it has, unless the device is more than one step behind).
        previous = self._planned.get(id(wrapper))
        if previous is not None:
            previous.synchronize()
        if isinstance(wrapper, flashinfer.BatchPrefillWithPagedKVCacheWrapper):
            qo_indptr, kv_indptr, _, last_page_len, *_, page_size = args  # host tensors, pinned
            # the longest query, which plan() otherwise finds by a Python loop over the tensor's
            # elements (~0.2 ms for a graph's 129 Hydragen entries); only the cuDNN backend reads it
            kwargs["max_token_per_sequence"] = int(np.diff(qo_indptr.numpy()).max())
            # each entry's KV length, pinned: plan() otherwise computes it into pageable memory and
            # copies it to the device from there, which the CUDA runtime may start only once the
            # stream has drained (the host runs a step ahead; tests/gpu/test_launch_async.py)
            kwargs["seq_lens"] = _pinned(np.maximum(np.diff(kv_indptr.numpy()) - 1, 0) * page_size
                                         + last_page_len.numpy())
        wrapper.plan(*args, **kwargs)
        done = self._planned[id(wrapper)] = torch.cuda.Event()
        done.record()

    def forward(self, layer, q, k, v, out=None):
        kv = self.cache.layers[layer]
        rows, positions, indices, indptr, last_len = self.append_args
        # the append kernel reads k and v as the cache's type (it does not convert)
        k, v = self.cache.quantize(layer, k, v)
        flashinfer.append_paged_kv_cache(k, v, rows, positions, kv, indices, indptr, last_len, "NHD")
        scales = self._scales(layer)
        slot = self.graph
        if slot is not None and self.graph_grouped:
            out, lse = self._rows(layer, q, kv, slot.wrapper, return_lse=True, out=out)
            shared, shared_lse = _prefill(slot.prefix.wrapper, q, kv, return_lse=True, **scales)
            flashinfer.merge_state_in_place(out, lse, shared, shared_lse, mask=slot.prefix.grouped)
            return out
        if slot is not None:
            return self._rows(layer, q, kv, slot.wrapper, out=out)
        t = self.num_prefill_tokens
        if t == q.shape[0]:
            return _prefill(self.prefill, q, kv, out=out, **scales)
        if t == 0:
            return self._decode(layer, q, kv, scales, out=out)
        # both kernels write into one output: no copy of it a layer to join the two parts
        if out is None:
            out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        _prefill(self.prefill, q[:t], kv, out=out[:t], **scales)
        self._decode(layer, q[t:], kv, scales, out=out[t:])
        return out

    def _scales(self, layer: int) -> dict:
        """An FP8 cache's scales for the kernels; none at 1.0 (a v_scale costs a pass over the output)."""
        k_scale, v_scale = self.cache.scales[layer]
        return {name: s for name, s in (("k_scale", k_scale), ("v_scale", v_scale)) if s != 1.0}

    def _rows(self, layer: int, q, kv, wrapper, return_lse: bool = False, out: torch.Tensor | None = None):
        """Decode rows over the pages planned for them: by the Triton kernel, XQA (no log-sum-exp:
        it plans only steps without Hydragen groups), or FlashInfer's decode wrapper; into `out`
        where given."""
        if self.work is not None:
            # only Hydragen asks for log-sum-exps: its rows' own pages are mostly short (1-256 tokens
            # on shared-prefix), where a program per kv head is the faster kernel over bf16 pages too
            # (0.160 against 0.168 ms a layer of 2,048 rows on an H200, tools/gpu.py tune); over
            # sharegpt-like rows it is not (0.455 against 0.433), so other steps keep the default
            return triton_decode(q, kv, self.work, self.work_pages, *self.cache.scales[layer], return_lse=return_lse,
                                 out=out, per_kv_head=True if return_lse else None)
        if self.xqa is not None and not return_lse:
            return self.xqa.run(q, kv, *self.cache.scales[layer], out=out)
        return wrapper.run(q, kv, return_lse=return_lse, out=out, **self._scales(layer))

    def _decode(self, layer: int, q, kv, scales: dict, out: torch.Tensor | None = None):
        if not self.grouped:
            return self._rows(layer, q, kv, self.decode, out=out)
        # Hydragen: own pages per row, shared pages per group, merged by their log-sum-exps (both
        # computed with the same k_scale folded into the softmax scale, so they merge as they are)
        out, lse = self._rows(layer, q, kv, self.decode, return_lse=True, out=out)
        n = self.grouped
        shared, shared_lse = _prefill(self.prefix, q[:n], kv, return_lse=True, **scales)
        flashinfer.merge_state_in_place(out[:n], lse[:n], shared, shared_lse)
        return out


def _prefill(wrapper, q: torch.Tensor, kv: torch.Tensor, out: torch.Tensor | None = None, **kwargs):
    """A prefill wrapper's run into `out`, or into a new uninitialized buffer: FlashInfer zero-fills an
    output it allocates itself, a pass over it a layer (16 fill kernels a Hydragen step)."""
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    return wrapper.run(q, kv, out=out, **kwargs)


def _pinned(values: np.ndarray) -> torch.Tensor:
    """Host int32 tensor in pinned memory (the staging ring's): FlashInfer's planners read it on the
    host and copy it to the device asynchronously."""
    return RING.host(values.astype(np.int32))
