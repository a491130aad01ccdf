"""The fused sampling kernel against the torch sampling code it replaces (CUDA only; with
TRITON_INTERPRET=1 the same checks run on CPU tensors)."""

from __future__ import annotations

import os

import pytest
import torch

from workers.sampling import SamplingBatch, row_keys, sample
from workers.sampling_kernel import combine, fused_sample, sample_partials

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(sample_partials is None or not (torch.cuda.is_available() or INTERPRET),
                                reason="needs CUDA and Triton")


def reference(logits, temperature, seeds, positions, random, raw):
    """The torch path of sample() on the same rows, whatever device they are on."""
    rows = logits.shape[0]
    b = SamplingBatch(temperature, torch.ones(rows, device=logits.device), torch.zeros(rows, dtype=torch.int64,
                      device=logits.device), seeds, positions, filtered=True, random=random, num_top=0,
                      raw_logprobs=raw)
    # filtered=True with top_p 1 and top_k 0 keeps every token: the torch code, same distribution
    tokens, chosen, _, _ = sample(logits.float(), b)
    return tokens, chosen


@pytest.mark.parametrize("raw", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("random", [False, True])
def test_fused_sampling_matches_torch(dtype, random, raw):
    torch.manual_seed(0)
    rows, vocab = (8, 5000) if INTERPRET else (64, 32000 + 17)  # a vocab that is not a block multiple
    logits = (torch.randn(rows, vocab, device=DEVICE) * 3).to(dtype)
    temperature = torch.tensor([0.0, 0.5, 1.0, 1.5] * (rows // 4), device=DEVICE)
    seeds = torch.arange(rows, device=DEVICE) * 7919 % 2**32
    positions = torch.arange(rows, device=DEVICE) + 100
    want_tokens, want_lp = reference(logits, temperature, seeds, positions, random, raw)
    tokens, lp = fused_sample(logits, temperature, row_keys(seeds, positions), random, raw=raw)
    agree = (tokens == want_tokens).float().mean().item()
    assert agree >= 0.95 and (tokens == want_tokens)[temperature <= 0].all(), agree  # greedy rows exactly
    same = tokens == want_tokens
    torch.testing.assert_close(lp[same], want_lp[same], atol=1e-3, rtol=1e-3)


def test_fused_sampling_follows_the_distribution():
    """Over many positions, sampled tokens of a 4-token distribution appear at its probabilities."""
    probs = torch.tensor([0.5, 0.25, 0.15, 0.10])
    rows = 2000 if INTERPRET else 20000
    logits = probs.log().repeat(rows, 1).to(DEVICE)
    temperature = torch.ones(rows, device=DEVICE)
    keys = row_keys(torch.full((rows,), 3, device=DEVICE), torch.arange(rows, device=DEVICE))
    tokens, lp = fused_sample(logits, temperature, keys, True)
    freq = torch.bincount(tokens.cpu(), minlength=4).float() / rows
    assert (freq - probs).abs().max() < 4 * (0.25 / rows) ** 0.5
    torch.testing.assert_close(lp.cpu(), probs.log()[tokens.cpu()], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("random", [False, True])
def test_vocab_slices_combine_to_the_whole(random):
    """Tensor-parallel ranks each reduce their slice of the vocabulary (uneven here, as the last
    rank's is); combining the slices picks what one pass over the whole vocabulary picks."""
    torch.manual_seed(1)
    rows, vocab = (8, 3000) if INTERPRET else (64, 32000 + 17)
    logits = (torch.randn(rows, vocab, device=DEVICE) * 3).to(torch.bfloat16)
    logits[0, 5] = logits[0, vocab - 7] = logits[0].max() + 1  # a tie across slices: the lower id wins
    temperature = torch.tensor([0.0, 0.7] * (rows // 2), device=DEVICE)
    keys = row_keys(torch.arange(rows, device=DEVICE) * 31, torch.arange(rows, device=DEVICE) + 9)
    want_tokens, want_lp = fused_sample(logits, temperature, keys, random)
    cuts = [0, vocab // 3, vocab // 3 + 1, vocab]  # one slice of a single id
    parts = torch.cat([sample_partials(logits[:, lo:hi], temperature, keys, random, lo)
                       for lo, hi in zip(cuts, cuts[1:])])
    tokens, lp = combine(parts)
    assert torch.equal(tokens, want_tokens)
    assert tokens[0].item() == 5
    torch.testing.assert_close(lp, want_lp, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("random", [False, True])
@pytest.mark.parametrize("slices,warps", [(2, 4), (3, 8), (64, 4)])
def test_pieces_of_a_row_pick_what_one_program_picks(random, slices, warps):
    """A row cut into pieces, a program each (64: more than the vocabulary's blocks, so some are
    empty), combines to the tokens and logprobs of one pass, a tie across pieces included."""
    from workers.sampling_kernel import BLOCK

    torch.manual_seed(2)
    rows, vocab = (4, 3 * BLOCK + 5) if INTERPRET else (64, 128256)
    logits = (torch.randn(rows, vocab, device=DEVICE) * 3).to(torch.bfloat16)
    logits[0, 7] = logits[0, vocab - 3] = logits[0].max() + 1  # in the first and the last piece: the lower id wins
    temperature = torch.tensor([0.0, 0.6] * (rows // 2), device=DEVICE)
    keys = row_keys(torch.arange(rows, device=DEVICE) * 13, torch.arange(rows, device=DEVICE) + 5)
    parts = sample_partials(logits, temperature, keys, random, slices=slices, warps=warps)
    assert parts.shape[0] == slices  # as many on every tensor-parallel rank, whatever its slice
    tokens, lp = combine(parts)
    want_tokens, want_lp = fused_sample(logits, temperature, keys, random, slices=1)
    assert torch.equal(tokens, want_tokens) and tokens[0].item() == 7
    torch.testing.assert_close(lp, want_lp, atol=1e-5, rtol=1e-5)
