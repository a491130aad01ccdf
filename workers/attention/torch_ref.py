"""Plain-torch paged attention: the CPU backend and the reference the FlashInfer backend is tested
against. Scores and softmax run in float32 whatever the cache dtype."""

from __future__ import annotations

import torch

from workers.attention import AttentionBackend, AttentionBatch


class TorchAttention(AttentionBackend):
    def __init__(self, cache, num_heads: int, head_dim: int, dtype: torch.dtype | None = None):
        self.cache = cache
        self.dtype = dtype or cache.data.dtype
        self.num_heads = num_heads
        self.scale = head_dim**-0.5
        # the planned step (plan() sets them): the batch, where each new token's k/v goes, and the
        # decode rows' context (page, offset, valid) padded to the longest
        self.batch: AttentionBatch | None = None
        self.write_page = self.write_off = None
        self.dec_valid = self.dec_page = self.dec_off = None
        self.kv_scales = (1.0, 1.0)  # the layer forward() runs: an FP8 cache's (k_scale, v_scale)

    def add_graph_size(self, bs: int, max_pages: int, groups: int = 0) -> None:
        raise RuntimeError("the torch attention backend does not run CUDA graphs: launch with --no-cuda-graphs")

    def plan(self, batch: AttentionBatch, graph_size: int | None = None) -> None:
        if graph_size is not None:
            raise RuntimeError("the torch attention backend does not run CUDA graphs")
        ps = self.cache.page_size
        self.batch = batch
        rows = torch.arange(len(batch.q_lens_host), device=batch.positions.device)
        row_of_token = batch.token_rows.long()
        pos = batch.positions.long()
        self.write_page = batch.page_indices[batch.page_indptr[row_of_token].long() + pos // ps].long()
        self.write_off = pos % ps
        dec = range(batch.num_prefill, len(batch.q_lens_host))
        if len(dec):
            max_len = int(batch.kv_lens_host[batch.num_prefill :].max())
            j = torch.arange(max_len, device=rows.device)
            drows = rows[batch.num_prefill :]
            kv_lens = batch.kv_lens[batch.num_prefill :].long()
            self.dec_valid = j[None, :] < kv_lens[:, None]
            if batch.groups is not None:  # Hydragen: rows in a group attend here to their own pages only
                own_from = torch.as_tensor(batch.groups.suffix_start_host * ps, device=rows.device)
                self.dec_valid &= j[None, :] >= own_from[:, None]
            slot = (batch.page_indptr[drows].long()[:, None] + j[None, :] // ps)
            slot = slot.clamp(max=batch.page_indices.numel() - 1)
            self.dec_page = batch.page_indices[slot].long()
            self.dec_off = (j % ps)[None, :].expand_as(self.dec_page)

    def forward(self, layer, q, k, v, out=None):
        kv = self.cache.layers[layer]
        kv[self.write_page, 0, self.write_off], kv[self.write_page, 1, self.write_off] = self.cache.quantize(layer, k, v)
        # the reference reads exactly what an FP8 cache holds, scaled back
        self.kv_scales = self.cache.scales[layer] if self.cache.fp8 else (1.0, 1.0)
        b = self.batch
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device) if out is None else out
        start = 0
        for r in range(b.num_prefill):
            q_len, kv_len = int(b.q_lens_host[r]), int(b.kv_lens_host[r])
            pages = b.page_indices[b.page_indptr_host[r] : b.page_indptr_host[r + 1]].long()
            keys = kv[pages, 0].flatten(0, 1)[:kv_len]
            vals = kv[pages, 1].flatten(0, 1)[:kv_len]
            qpos = torch.arange(kv_len - q_len, kv_len, device=q.device)
            mask = torch.arange(kv_len, device=q.device)[None, :] <= qpos[:, None]
            out[start : start + q_len] = self._attend(q[start : start + q_len][None], keys[None], vals[None], mask[None])[0][0].to(q.dtype)
            start += q_len
        if start < q.shape[0]:
            keys = kv[self.dec_page, 0, self.dec_off]  # [rows, len, kv_heads, d]
            vals = kv[self.dec_page, 1, self.dec_off]
            dec, lse = self._attend(q[start:, None], keys, vals, self.dec_valid[:, None, :])
            dec = dec[:, 0]
            if b.groups is not None:
                self._merge_prefixes(kv, q[start:], dec, lse[:, :, 0])
            out[start:] = dec.to(q.dtype)
        return out

    def _merge_prefixes(self, kv, q, dec, dec_lse) -> None:
        """Hydragen's maths: each group's queries attend to its shared pages at once; the result is
        merged, by log-sum-exp weights, into the rows' attention over their own pages (in place)."""
        g = self.batch.groups
        row = 0
        for i, n in enumerate(g.rows_host.tolist()):
            pages = g.prefix_indices[g.prefix_indptr_host[i] : g.prefix_indptr_host[i + 1]].long()
            keys, vals = kv[pages, 0].flatten(0, 1)[None], kv[pages, 1].flatten(0, 1)[None]
            mask = torch.ones(1, n, keys.shape[1], dtype=torch.bool, device=q.device)
            pre, pre_lse = self._attend(q[row : row + n][None], keys, vals, mask)  # [1, n, H, D], [1, H, n]
            lse = torch.stack([pre_lse[0].T, dec_lse[row : row + n]])  # [2, n, H]
            w = torch.softmax(lse, dim=0)[..., None]
            dec[row : row + n] = w[0] * pre[0] + w[1] * dec[row : row + n]
            row += n

    def _attend(self, q, k, v, mask):
        """q: [B, Q, H, D]; k, v: [B, K, KVH, D]; mask: [B, Q, K] (True = attend). Returns the output
        [B, Q, H, D] in float32 and the log-sum-exp of the scores [B, H, Q]."""
        groups = self.num_heads // k.shape[2]
        k_scale, v_scale = self.kv_scales
        k = (k.float() * k_scale).repeat_interleave(groups, dim=2)
        v = (v.float() * v_scale).repeat_interleave(groups, dim=2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k) * self.scale
        scores = scores.masked_fill(~mask[:, None], float("-inf"))
        probs = scores.softmax(dim=-1)
        return torch.einsum("bhqk,bkhd->bqhd", probs, v), torch.logsumexp(scores, dim=-1)
