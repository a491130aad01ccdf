"""CUDA graphs of a rank's forward: decode steps captured whole for each batch size (and again with
Hydragen groups), other steps' forwards captured in pieces cut at every layer's attention. The
ModelRunner takes these methods as a mixin; they read its buffers (page table, scratch slot and
page, last tokens) and fill its `graphs`, `grouped_graphs` and `pieces`, which it creates empty.
"""

from __future__ import annotations

import numpy as np
import torch

from toka.protocol import StepPlan
from workers.attention import AttentionBackend
from workers.layers.attention import ForwardContext


class Pieces:
    """Stands in for the attention backend while a forward is captured: each layer's call ends the
    graph being captured and begins the next, which reads the attention output from a fixed buffer.
    The layers' qkv projections write into one fixed buffer too (ForwardContext.qkv) and rotate q
    and k there in place, so the graphs leave q, k and v where `replay()` runs the real backend's
    attention between them, with no copies; a layer whose q or k comes elsewhere (a q/k norm, a
    rotary kind done out of place) has them copied in. Without a pool (a warm-up) nothing is captured."""

    def __init__(self, qkv: torch.Tensor, out: torch.Tensor, heads: tuple[int, int, int], pool=None):
        self.qkv = qkv  # [tokens, (heads + 2 kv_heads) x head_dim], the largest size's
        self.out = out  # [tokens, heads, head_dim]
        self.heads = heads  # heads, kv heads, head_dim
        self.pool = pool
        self.graphs: list[torch.cuda.CUDAGraph] = []
        self.layers: list[int] = []

    def views(self, tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v of the first `tokens` tokens, as the qkv projection's split leaves them."""
        hq, hkv, d = self.heads
        q, k, v = self.qkv[:tokens].split([hq * d, hkv * d, hkv * d], dim=-1)
        return q.view(tokens, hq, d), k.view(tokens, hkv, d), v.view(tokens, hkv, d)

    def begin(self) -> None:
        self.graphs.append(torch.cuda.CUDAGraph())
        self.graphs[-1].capture_begin(pool=self.pool)

    def end(self) -> None:
        self.graphs[-1].capture_end()

    def forward(self, layer: int, q, k, v) -> torch.Tensor:
        n = q.shape[0]
        for fixed, x in zip(self.views(n), (q, k, v)):
            if x.data_ptr() != fixed.data_ptr() or x.stride() != fixed.stride():
                fixed.copy_(x)
        self.layers.append(layer)
        if self.pool is not None:
            self.end()
            self.begin()
        return self.out[:n]

    def replay(self, attn: AttentionBackend, tokens: int) -> None:
        """The captured forward, attention for the first `tokens` tokens (attn planned for them)."""
        q, k, v = self.views(tokens)
        out = self.out[:tokens]
        for graph, layer in zip(self.graphs, self.layers):
            graph.replay()
            attn.forward(layer, q, k, v, out=out)
        self.graphs[-1].replay()


class CudaGraphs:
    """ModelRunner's capture and replay (a mixin: the state it uses is the runner's)."""

    def capture_graphs(self, sizes: list[int], min_group: int = 0) -> None:
        """Captures the forward of decode-only steps of each batch size (padding rows use the
        scratch slot and page); with `min_group` (Hydragen groups have at least that many rows)
        also of decode steps with groups, for each size that holds one. Call once, after the KV
        cache exists and before serving."""
        max_bs = max(sizes)
        if self.model.stage.first:
            self.g_ids = torch.zeros(max_bs, dtype=torch.int64, device=self.device)
        else:  # the previous stage's output, received into it before each replay
            self.g_ids = torch.zeros(max_bs, self.model.config.hidden_size, dtype=self.dtype, device=self.device)
        self.g_pos = torch.zeros(max_bs, dtype=torch.int64, device=self.device)
        self.g_seq = torch.ones(max_bs, dtype=torch.int64, device=self.device)
        # a padding row of a grouped capture shares one page and has one of its own: both the scratch page
        self.page_table[self.scratch_slot, 1] = self.scratch_page
        self.min_group = min_group
        pool = torch.cuda.graph_pool_handle()
        for bs in sorted(sizes, reverse=True):
            groups = bs // min_group if min_group else 0
            # the most pages a step reads: every page of the cache, and the padding rows' scratch page
            max_pages = min(bs * self.page_table.shape[1], self.scratch_page) + bs
            self.attn.add_graph_size(bs, max_pages, groups)
            self._plan_graph(bs, [self.scratch_slot] * bs, [1] * bs)
            self.graphs[bs] = self._capture(bs, pool)
            if groups:
                self._plan_graph(bs, [self.scratch_slot] * bs, [self.page_size + 1] * bs, [min_group] * groups,
                                 [1] * groups)
                self.grouped_graphs[bs] = self._capture(bs, pool)
        torch.cuda.synchronize()

    def _capture(self, bs: int, pool) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """The forward of the step just planned into size bs's buffers, as a graph and its output."""
        ctx = ForwardContext(self.attn, self.g_pos[:bs], self.g_seq[:bs])
        self.model(self.g_ids[:bs], ctx)  # warm-up outside the graph
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            out = self.model(self.g_ids[:bs], ctx)
        return graph, out

    def capture_pieces(self, sizes: list[int]) -> None:
        """Captures the forward of steps of each token count in `sizes` as CUDA graphs cut at every
        layer's attention, which runs eagerly between them on the step's own plan: mixed and prefill
        steps then launch a graph a layer instead of a dozen kernels, and a step of fewer tokens runs
        in the next size up (the padding tokens' rows are computed and dropped; attention and the
        KV append see only the real ones). One stage only: a pipeline's stages run eagerly."""
        layer = next(iter(self.model.model.layers.values())).self_attn
        n = max(sizes)
        i64 = dict(dtype=torch.int64, device=self.device)
        self.p_ids, self.p_pos, self.p_seq = torch.zeros(n, **i64), torch.zeros(n, **i64), torch.ones(n, **i64)
        heads = (layer.num_heads, layer.num_kv_heads, layer.head_dim)
        qkv = torch.zeros(n, (layer.num_heads + 2 * layer.num_kv_heads) * layer.head_dim, dtype=self.dtype,
                          device=self.device)
        out = torch.zeros(n, layer.num_heads, layer.head_dim, dtype=self.dtype, device=self.device)
        # every size's output goes to this one buffer (a graph's own output would stay allocated per size)
        self.p_out = torch.zeros(n, self.model.config.hidden_size, dtype=self.dtype, device=self.device)
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        for size in sorted(sizes, reverse=True):
            ids, pos, seq = self.p_ids[:size], self.p_pos[:size], self.p_seq[:size]
            self.model(ids, ForwardContext(Pieces(qkv, out, heads), pos, seq, qkv))  # warm-up outside the graphs
            pieces = Pieces(qkv, out, heads, pool)
            torch.cuda.synchronize()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                pieces.begin()
                self.p_out[:size].copy_(self.model(ids, ForwardContext(pieces, pos, seq, qkv)))
                pieces.end()
            torch.cuda.current_stream().wait_stream(stream)
            self.pieces[size] = pieces
        torch.cuda.synchronize()

    def _plan_graph(self, bs: int, slots: list[int], kv_lens: list[int], group_rows=(), group_pages=()) -> torch.Tensor:
        batch, slots_d = self._attention_batch(slots, [1] * bs, kv_lens, 0, group_rows, group_pages)
        self.g_pos[:bs].copy_(batch.positions)
        self.g_seq[:bs].copy_(batch.seq_lens)
        self.attn.plan(batch, graph_size=bs)
        return slots_d

    def _graph_for(self, plan: StepPlan) -> tuple[int, dict] | None:
        """The captured size a decode-only plan replays in (the smallest that holds its rows and
        its groups), with the graphs it is one of; None to run it eagerly."""
        if plan.num_prefill:
            return None
        graphs = self.grouped_graphs if plan.group_rows else self.graphs
        need = max(len(plan.slots), len(plan.group_rows) * self.min_group)  # size s holds s // min_group groups
        size = min((s for s in graphs if s >= need), default=None)
        return None if size is None else (size, graphs)

    def _replay(self, plan: StepPlan, bs: int, graphs: dict):
        n = len(plan.slots)
        pad = bs - n
        slots = self._plan_graph(bs, plan.slots + [self.scratch_slot] * pad, plan.kv_lens + [1] * pad,
                                 plan.group_rows, plan.group_pages)
        if self.model.stage.first:
            torch.index_select(self.last_token, 0, slots, out=self.g_ids[:bs])
        else:  # padding rows keep earlier (finite) values
            self.pipe.recv_hidden(self.g_ids[:n])
        graph, out = graphs[bs]
        self._mark_forward()
        graph.replay()
        # a copy: the next replay overwrites the graph's output while a send may still read it
        return (out[:n] if self.model.stage.last else out[:n].clone()), np.arange(n + 1)  # qo_indptr: a token a row
