"""Sampling and logprobs on the rank's device, with no host synchronization.

Randomness is a hash of (request seed, token position, vocab id) rather than a generator's state:
a request's samples do not depend on which other requests share its batch, on preemption and
recomputation, or on which rank draws them, so seeded outputs are reproducible and tensor-parallel
ranks agree without communicating. The Gumbel-max trick turns the hashed uniforms into a sample
from the processed distribution: softmax(logits / temperature) after the logits processor
(penalties, logit_bias, min_tokens) and min-p, top-k and top-p.

Reported logprobs are the model's own log-softmax of the raw logits by default (`raw`, as OpenAI
and vLLM report them, whatever the temperature), or the processed distribution sampled from
(`processed`, for RL; greedy rows then report their logits' unfiltered log-softmax).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

_M32 = 0xFFFFFFFF
MIN_LOGPROB = -9999.0


def fold_seed(seed: int) -> int:
    """Any Python int -> the 32-bit seed the hash takes."""
    seed &= (1 << 64) - 1
    return (seed ^ (seed >> 32)) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit avalanche mix (lowbias32) on int64 tensors holding values below 2**32."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def row_keys(seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The hash key of each row's draw: [rows] int64 below 2**32, from its seed and position."""
    return _mix32((seeds * 0x9E3779B1 + positions * 0x85EBCA77 + 0x165667B1) & _M32)


def gumbel(seeds: torch.Tensor, positions: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Gumbel noise [rows, V] for vocab `ids` ([V] or [rows, V]); seeds, positions: [rows] int64.
    The fused kernel (workers/sampling_kernel.py) computes the same bits."""
    x = _mix32((row_keys(seeds, positions)[:, None] + ids * 0xC2B2AE3D) & _M32)
    u = ((x >> 9) * 2 + 1).float() * (1.0 / (1 << 24))  # odd / 2**24: exact in float32, strictly in (0, 1)
    return -torch.log(-torch.log(u))


@dataclass
class SamplingBatch:
    """Per-row settings, all [rows] tensors on the logits' device."""

    temperature: torch.Tensor  # float32; 0 = greedy
    top_p: torch.Tensor  # float32 in (0, 1]
    top_k: torch.Tensor  # int64; 0 = off
    seeds: torch.Tensor  # int64, folded to 32 bits
    positions: torch.Tensor  # int64: the position the sampled token will take
    filtered: bool  # host-known: does any row use min-p, top-p or top-k
    random: bool  # host-known: does any row sample (temperature > 0); else no noise is drawn
    num_top: int  # host-known: the most alternatives any row asked for
    min_p: torch.Tensor | None = None  # float32 in [0, 1]; None: no row uses it
    raw_logprobs: bool = True  # report the raw logits' log-softmax, not the processed distribution
    # host-known: the rows need the logits processor; process(logits) edits the float32 logits
    process: Callable[[torch.Tensor], torch.Tensor] | None = None


def fused(cuda: bool, filtered: bool, num_top: int, processed: bool) -> bool:
    """Whether sample_hidden takes the fused kernel for a batch: on CUDA with Triton, without
    filters (min-p, top-p, top-k), alternatives or logits processing."""
    from workers.sampling_kernel import sample_partials  # here: the kernel's module imports this one

    return cuda and sample_partials is not None and not filtered and num_top == 0 and not processed


def sample_hidden(head, hidden: torch.Tensor, b: SamplingBatch):
    """Samples the rows of `hidden` [rows, hidden] through the LM head (a ParallelLMHead); returns
    what `sample` does. Where `fused`, one fused pass reduces each rank's slice of the logits and
    only four numbers a row cross ranks; otherwise the head gathers the whole vocabulary's logits
    for `sample`."""
    if fused(hidden.is_cuda, b.filtered, b.num_top, b.process is not None):
        from workers.sampling_kernel import combine, sample_partials

        keys = row_keys(b.seeds, b.positions) if b.random else b.seeds  # greedy rows read no noise
        parts = head.reduce_slices(hidden, lambda logits, offset: sample_partials(
            logits, b.temperature, keys, b.random, offset, raw=b.raw_logprobs))
        return (*combine(parts.flatten(0, 1)), None, None)  # [ranks, pieces, ...]: in vocab order
    return sample(head(hidden), b)


def sample(logits: torch.Tensor, b: SamplingBatch):
    """logits: [rows, V] (any float dtype). Returns tokens [rows], their logprobs [rows] (float32),
    and the num_top best (ids, logprobs) [rows, num_top] of the reported distribution."""
    logits = logits.float()
    raw = logits
    if b.process is not None:  # edits in place: a copy only where the raw logits are still reported
        logits = b.process(logits.clone() if b.raw_logprobs else logits)
    greedy = b.temperature <= 0
    temp = torch.where(greedy, torch.ones_like(b.temperature), b.temperature)
    logprobs = torch.log_softmax(logits / temp[:, None], dim=-1)
    vocab = torch.arange(logits.shape[-1], device=logits.device)
    if b.filtered:
        sorted_lp, order = logprobs.sort(dim=-1, descending=True)
        probs = sorted_lp.exp()
        before = probs.cumsum(dim=-1) - probs  # mass strictly ahead of each token
        keep = (before < b.top_p[:, None]) | (b.top_p[:, None] >= 1.0)  # rounding must not cut the tail
        keep &= (b.top_k[:, None] <= 0) | (vocab[None, :] < b.top_k[:, None])
        if b.min_p is not None:  # sorted: probs[:, 0] is the most likely token's
            keep &= probs >= b.min_p[:, None] * probs[:, :1]
        keep |= greedy[:, None]  # the argmax needs no filter, and its logprobs stay the model's own
        sorted_lp = sorted_lp.masked_fill(~keep, float("-inf"))
        renorm = torch.logsumexp(sorted_lp, dim=-1, keepdim=True)
        logprobs = torch.full_like(logprobs, float("-inf")).scatter_(1, order, sorted_lp - renorm)
    tokens = logits.argmax(dim=-1)
    if b.random:
        noisy = logprobs + gumbel(b.seeds, b.positions, vocab)
        tokens = torch.where(greedy, tokens, noisy.argmax(dim=-1))
    if b.raw_logprobs:
        logprobs = torch.log_softmax(raw, dim=-1)
    # -inf (filtered out) is reported as -9999, as OpenAI-style APIs do: JSON has no infinity
    chosen = logprobs.gather(1, tokens[:, None])[:, 0].clamp(min=MIN_LOGPROB)
    if b.num_top > 0:
        top_lp, top_ids = logprobs.topk(b.num_top, dim=-1)
        top_lp = top_lp.clamp(min=MIN_LOGPROB)
    else:
        top_lp = top_ids = None
    return tokens, chosen, top_ids, top_lp
