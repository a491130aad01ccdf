"""FlashInfer attention over the paged KV cache (CUDA).

Per step, `plan()` runs FlashInfer's planners once (on host metadata, outside the layers and
outside CUDA graphs); every layer then appends its new K/V into the cache and runs the prefill
rows through the paged prefill wrapper and the decode rows through the paged decode wrapper
(FlashInfer's decode kernel on CUDA cores, or with `tensor_core_decode` its FA2 tensor-core path).

CUDA graphs: a decode-only step of `bs` rows can run inside a captured graph. Each captured size
has its own decode wrapper whose metadata lives in fixed device buffers (FlashInfer's
use_cuda_graph mode) and fixed buffers for the append; `plan()` refills them before a replay.
"""

from __future__ import annotations

import flashinfer
import numpy as np
import torch

from workers.attention import AttentionBackend, AttentionBatch, cumsum0

WORKSPACE_BYTES = 256 * 1024 * 1024


def _decode_args(tensor_cores: bool) -> dict:
    # FlashInfer's tensor-core decode runs its FA2 prefill kernel with one query a row; its FA3 one
    # reads the cache at a seventh of the copy bandwidth there (tools/bench_attention.py)
    return dict(use_tensor_cores=True, backend="fa2") if tensor_cores else {}


class _GraphSlot:
    """Fixed buffers of one captured decode batch size."""

    def __init__(self, bs: int, max_pages: int, device, workspace, tensor_cores: bool):
        i32 = dict(dtype=torch.int32, device=device)
        self.indptr = torch.zeros(bs + 1, **i32)
        self.indices = torch.zeros(max_pages, **i32)
        self.last_len = torch.ones(bs, **i32)
        self.rows = torch.arange(bs, **i32)
        self.positions = torch.zeros(bs, **i32)
        self.wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            workspace, "NHD", use_cuda_graph=True, paged_kv_indptr_buffer=self.indptr,
            paged_kv_indices_buffer=self.indices, paged_kv_last_page_len_buffer=self.last_len,
            **_decode_args(tensor_cores),
        )


class FlashInferAttention(AttentionBackend):
    def __init__(self, cache, num_heads: int, head_dim: int, tensor_core_decode: bool = False,
                 dtype: torch.dtype | None = None):
        self.cache = cache
        self.tensor_core_decode = tensor_core_decode
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
                                                                  **_decode_args(tensor_core_decode))
        # Hydragen: each group's queries against its shared pages, a non-causal prefill-shaped problem
        # (a group's many queries share each key read); runs after `prefill` in the same stream
        self.prefix = flashinfer.BatchPrefillWithPagedKVCacheWrapper(self.prefill_ws, "NHD")
        self.grouped = 0  # decode rows in Hydragen groups this step
        self.graph_slots: dict[int, _GraphSlot] = {}
        self.graph: _GraphSlot | None = None  # the planned step's graph buffers, or None when eager
        # the planned step's append_paged_kv_cache arguments (rows, positions, page indices, indptr,
        # last page lengths) and how many of its tokens are prefill tokens (plan() sets them)
        self.append_args: tuple = ()
        self.num_prefill_tokens = 0
        self._planned: dict[int, torch.cuda.Event] = {}  # id(wrapper) -> recorded after its last plan

    def add_graph_size(self, bs: int, max_pages: int) -> None:
        self.graph_slots[bs] = _GraphSlot(bs, max_pages, self.cache.data.device, self.decode_ws,
                                          self.tensor_core_decode)

    def plan(self, batch: AttentionBatch, graph_size: int | None = None) -> None:
        n_pre = batch.num_prefill
        common = dict(q_data_type=self.dtype, kv_data_type=self.kv_dtype)
        heads = (self.num_heads, self.num_kv_heads, self.head_dim, self.cache.page_size)
        indptr, last_len = batch.page_indptr_host, batch.last_page_len_host
        if graph_size is not None:
            slot = self.graph = self.graph_slots[graph_size]
            slot.positions.copy_(batch.positions)
            self._plan(slot.wrapper, _pinned(indptr), batch.page_indices, _pinned(last_len), *heads, **common)
            # the graph reads these fixed buffers, which plan() just refilled
            self.append_args = (slot.rows, slot.positions, slot.indices, slot.indptr, slot.last_len)
            self.num_prefill_tokens = 0
            return
        self.graph = None
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
            self._plan(self.decode, _pinned(g.suffix_indptr_host), g.suffix_indices, _pinned(last_len[n_pre:]),
                       *heads, **common)
        elif n_pre < len(last_len):
            base = indptr[n_pre]
            self._plan(self.decode, _pinned(indptr[n_pre:] - base), batch.page_indices[base:],
                       _pinned(last_len[n_pre:]), *heads, **common)

    def _plan(self, wrapper, *args, **kwargs) -> None:
        # A wrapper's plan() fills its pinned buffer and enqueues a copy from it to the device. The
        # host runs a step ahead of the device, so before refilling that buffer wait until the copy
        # of the wrapper's previous plan has run (it has, unless the device is more than one step behind).
        previous = self._planned.get(id(wrapper))
        if previous is not None:
            previous.synchronize()
        wrapper.plan(*args, **kwargs)
        done = self._planned[id(wrapper)] = torch.cuda.Event()
        done.record()

    def forward(self, layer, q, k, v):
        kv = self.cache.layers[layer]
        rows, positions, indices, indptr, last_len = self.append_args
        # the append kernel reads k and v as the cache's type (it does not convert)
        k, v = self.cache.quantize(layer, k, v)
        flashinfer.append_paged_kv_cache(k, v, rows, positions, kv, indices, indptr, last_len, "NHD")
        scales = self._scales(layer)
        if self.graph is not None:
            return self.graph.wrapper.run(q, kv, **scales)
        t = self.num_prefill_tokens
        if t == q.shape[0]:
            return self.prefill.run(q, kv, **scales)
        decode = self._decode(q[t:], kv, scales)
        return decode if t == 0 else torch.cat([self.prefill.run(q[:t], kv, **scales), decode])

    def _scales(self, layer: int) -> dict:
        """An FP8 cache's scales for the kernels; none at 1.0 (a v_scale costs a pass over the output)."""
        k_scale, v_scale = self.cache.scales[layer]
        return {name: s for name, s in (("k_scale", k_scale), ("v_scale", v_scale)) if s != 1.0}

    def _decode(self, q, kv, scales: dict):
        if not self.grouped:
            return self.decode.run(q, kv, **scales)
        # Hydragen: own pages per row, shared pages per group, merged by their log-sum-exps (both
        # computed with the same k_scale folded into the softmax scale, so they merge as they are)
        out, lse = self.decode.run(q, kv, return_lse=True, **scales)
        n = self.grouped
        shared, shared_lse = self.prefix.run(q[:n], kv, return_lse=True, **scales)
        flashinfer.merge_state_in_place(out[:n], lse[:n], shared, shared_lse)
        return out


def _pinned(values: np.ndarray) -> torch.Tensor:
    """Host int32 tensor in pinned memory: FlashInfer's planners copy it to the device asynchronously."""
    return torch.from_numpy(values.astype(np.int32)).pin_memory()
