"""Attention behind one small interface: the runner calls `plan()` once per step with the batch's
layout, then every layer calls `forward()` with its projected q, k, v.

`AttentionBatch` fields and where they live:
  qo_indptr, page_indptr, page_indices, last_page_len, kv_lens, token_rows: int32 tensors on the
  rank's device; positions, seq_lens: int64 on the device (per token)
  *_host: the same metadata as int64 numpy arrays (host), for planners that work on the host
  num_prefill: rows [0, num_prefill) are prefill chunks, the rest decode one token each
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import numpy as np
import torch


def cumsum0(counts: np.ndarray) -> np.ndarray:
    """[0, c0, c0 + c1, ...]: the CSR offsets of consecutive runs of these lengths (int64, host)."""
    out = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=out[1:])
    return out


@dataclass
class PrefixGroups:
    """Hydragen: the first sum(rows_host) decode rows form groups of rows_host[g] consecutive rows
    that share their leading pages (cached, never written). Attention over a group's shared pages
    is computed once for all its queries and merged with each decode row's attention over its own
    pages, the ones after its group's prefix (all of them for rows in no group)."""

    rows_host: np.ndarray  # [groups]
    prefix_indptr_host: np.ndarray  # [groups + 1]: shared pages per group
    prefix_indices: torch.Tensor  # int32 [shared pages], device
    suffix_indptr_host: np.ndarray  # [decode rows + 1]: own pages per decode row
    suffix_indices: torch.Tensor  # int32 [own pages], device
    suffix_start_host: np.ndarray  # [decode rows]: index of each row's first own page in its table


@dataclass
class AttentionBatch:
    qo_indptr: torch.Tensor  # [rows + 1]
    page_indptr: torch.Tensor  # [rows + 1]
    page_indices: torch.Tensor  # [pages used]
    last_page_len: torch.Tensor  # [rows]
    kv_lens: torch.Tensor  # [rows]
    positions: torch.Tensor  # [tokens]
    token_rows: torch.Tensor  # [tokens]: the row each token belongs to
    seq_lens: torch.Tensor  # [tokens]: its row's kv length
    q_lens_host: np.ndarray  # [rows]
    kv_lens_host: np.ndarray  # [rows]
    qo_indptr_host: np.ndarray  # [rows + 1]
    page_indptr_host: np.ndarray  # [rows + 1]
    last_page_len_host: np.ndarray  # [rows]
    num_prefill: int
    groups: PrefixGroups | None = None
    # the runner's page table (slot -> pages, int32 [slots, max pages a sequence]) and each row's
    # slot (int64 [rows]): for kernels that read a dense table a row (XQA)
    page_table: torch.Tensor | None = None
    slots: torch.Tensor | None = None


class AttentionBackend(abc.ABC):
    """What the runner and the layers call, in this order each step: `plan()` once (for a CUDA-graph
    replay, with the graph's size), then `forward()` once per layer. `add_graph_size()` is called
    before serving, once per captured size. `cache` is the paged KV cache the backend reads and
    writes (the runner sizes its probes by it)."""

    cache: object  # workers.kv_cache.KVCache
    dtype: torch.dtype  # of queries and outputs: the model's, also over an FP8 cache

    @abc.abstractmethod
    def add_graph_size(self, bs: int, max_pages: int, groups: int = 0) -> None:
        """Fixed buffers for replaying decode steps of `bs` rows reading up to `max_pages` pages;
        with `groups`, also for such steps with up to that many Hydragen groups."""

    @abc.abstractmethod
    def plan(self, batch: AttentionBatch, graph_size: int | None = None) -> None:
        """Plans the step. With `graph_size` (a size add_graph_size() made), the batch is decode-only,
        padded to that size, and its metadata goes into that size's buffers for a graph replay (the
        grouped graph's when the batch has groups)."""

    @abc.abstractmethod
    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                out: torch.Tensor | None = None) -> torch.Tensor:
        """q: [tokens, heads, head_dim]; k, v: [tokens, kv_heads, head_dim]. Appends all of k, v to
        the cache at the batch's positions, then returns causal attention output [tokens, heads,
        head_dim] (written into `out`, contiguous, where given); so a row may read pages another
        row of the same step writes (n > 1 sequences admitted together share the pages the first
        of them computes)."""


def make_backend(name: str, cache, num_heads: int, head_dim: int, decode_kernel: str = "cuda-cores",
                 dtype: torch.dtype | None = None) -> AttentionBackend:
    """decode_kernel: FlashInfer's kernel for decode rows, one of toka.config.DECODE_KERNELS (the torch reference
    has one path). dtype: of the queries and outputs, the model's (default: the cache's; needed
    with an FP8 cache)."""
    if name == "torch":
        from workers.attention.torch_ref import TorchAttention

        return TorchAttention(cache, num_heads, head_dim, dtype)
    if name == "flashinfer":
        from workers.attention.flashinfer_backend import FlashInferAttention

        return FlashInferAttention(cache, num_heads, head_dim, decode_kernel, dtype)
    raise ValueError(f"unknown attention backend {name!r}")
