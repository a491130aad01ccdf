"""Sampling: greedy, tempered logprobs, hashed seeded randomness, top-k / top-p, alternatives."""

import math

import pytest
import torch

from workers.sampling import MIN_LOGPROB, SamplingBatch, fold_seed, gumbel, sample


def batch(rows, temperature=1.0, top_p=1.0, top_k=0, seeds=0, positions=None, filtered=None, num_top=0,
          raw_logprobs=False, min_p=None):
    """Processed logprobs unless raw_logprobs: most tests here check the distribution sampled from."""
    def col(v, dtype):
        if isinstance(v, (list, tuple)):
            return torch.tensor(v, dtype=dtype)
        return torch.full((rows,), v, dtype=dtype)

    tp, tk = col(top_p, torch.float32), col(top_k, torch.int64)
    temp = col(temperature, torch.float32)
    mp = None if min_p is None else col(min_p, torch.float32)
    if filtered is None:
        filtered = bool((tp < 1).any() or (tk > 0).any() or mp is not None)
    return SamplingBatch(
        temperature=temp, top_p=tp, top_k=tk, seeds=col(seeds, torch.int64),
        positions=torch.arange(rows, dtype=torch.int64) if positions is None else col(positions, torch.int64),
        filtered=filtered, random=bool((temp > 0).any()), num_top=num_top, min_p=mp, raw_logprobs=raw_logprobs,
    )


def test_greedy_rows_take_the_argmax_and_report_untempered_logprobs():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 100, generator=g) * 3
    tokens, chosen, top_ids, top_lp = sample(logits, batch(16, temperature=0.0, seeds=list(range(16)), num_top=3))
    assert torch.equal(tokens, logits.argmax(-1))
    lp = torch.log_softmax(logits, -1)
    torch.testing.assert_close(chosen, lp.gather(1, tokens[:, None])[:, 0])
    want_lp, want_ids = lp.topk(3, -1)
    assert torch.equal(top_ids, want_ids)
    torch.testing.assert_close(top_lp, want_lp)


def test_greedy_row_in_a_filtered_batch_still_takes_the_argmax_with_model_logprobs():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 50, generator=g)
    b = batch(3, temperature=[0.0, 0.0, 1.0], top_k=[1, 0, 2], top_p=[1.0, 0.5, 1.0], num_top=2)
    tokens, chosen, _, _ = sample(logits, b)
    assert torch.equal(tokens[:2], logits[:2].argmax(-1))
    lp = torch.log_softmax(logits, -1)
    torch.testing.assert_close(chosen[:2], lp[:2].gather(1, tokens[:2, None])[:, 0])


@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.7])
def test_unfiltered_logprobs_are_log_softmax_of_tempered_logits(temperature):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(32, 64, generator=g) * 2
    tokens, chosen, top_ids, top_lp = sample(logits, batch(32, temperature=temperature, seeds=7, num_top=5))
    lp = torch.log_softmax(logits / temperature, -1)
    torch.testing.assert_close(chosen, lp.gather(1, tokens[:, None])[:, 0])
    want_lp, want_ids = lp.topk(5, -1)
    torch.testing.assert_close(top_lp, want_lp)
    assert torch.equal(top_ids, want_ids)


def test_seeded_samples_are_reproducible_and_independent_of_the_batch():
    g = torch.Generator().manual_seed(3)
    V = 200
    logits = torch.randn(6, V, generator=g)
    temps = [1.0, 0.8, 1.3, 1.0, 0.6, 1.0]
    seeds = [11, 12, 13, 11, 2**31 + 5, fold_seed(-7)]
    positions = [5, 9, 0, 6, 100, 3]
    top_k = [0, 0, 10, 0, 0, 0]
    top_p = [1.0, 0.9, 1.0, 1.0, 1.0, 1.0]
    full = sample(logits, batch(6, temps, top_p, top_k, seeds, positions, num_top=2))
    again = sample(logits.clone(), batch(6, temps, top_p, top_k, seeds, positions, num_top=2))
    assert torch.equal(full[0], again[0])
    # each row alone gives the same token
    for r in range(6):
        alone = sample(logits[r : r + 1], batch(1, temps[r], top_p[r], top_k[r], seeds[r], positions[r], num_top=2))
        assert alone[0].item() == full[0][r].item(), f"row {r}"
        torch.testing.assert_close(alone[1], full[1][r : r + 1])
    # rows in another order, with other rows around them
    perm = [4, 2, 0, 5, 3, 1]
    extra = torch.randn(3, V, generator=g)
    lg = torch.cat([logits[perm], extra])
    sh = sample(lg, batch(9, [temps[i] for i in perm] + [1.0] * 3, [top_p[i] for i in perm] + [0.5] * 3,
                          [top_k[i] for i in perm] + [3] * 3, [seeds[i] for i in perm] + [1, 2, 3],
                          [positions[i] for i in perm] + [0, 0, 0], num_top=4))
    assert sh[0][:6].tolist() == [full[0][i].item() for i in perm]


def test_different_seeds_and_positions_give_different_samples():
    V, n = 1000, 64
    logits = torch.zeros(n, V)  # uniform: every token equally likely
    base = sample(logits, batch(n, seeds=1, positions=list(range(n))))[0]
    other_seed = sample(logits, batch(n, seeds=2, positions=list(range(n))))[0]
    shifted = sample(logits, batch(n, seeds=1, positions=list(range(1, n + 1))))[0]
    # with 1000 equally likely tokens, a coincidence is rare: allow a few
    assert (base == other_seed).sum() <= 3
    assert (base[1:] == shifted[:-1]).all(), "the noise is a function of (seed, position)"
    assert (base[1:] != base[:-1]).sum() >= n - 4
    assert len(set(base.tolist())) >= n - 4


def _chi2(counts: torch.Tensor, probs: torch.Tensor) -> float:
    n = counts.sum().item()
    mask = probs > 0
    exp = probs[mask] * n
    return float((((counts[mask] - exp) ** 2) / exp).sum())


def _draw(logits_row, n, temperature=1.0, top_k=0, top_p=1.0, seed=123):
    V = logits_row.numel()
    logits = logits_row[None].expand(n, V).contiguous()
    b = batch(n, temperature, top_p, top_k, seed, positions=torch.arange(n).tolist(), num_top=V)
    tokens, chosen, top_ids, top_lp = sample(logits, b)
    return tokens, chosen, top_ids, top_lp


# chi-square with 7 degrees of freedom: P(X > 40) is about 1e-6
CHI2_LIMIT = 40.0


def test_empirical_distribution_matches_softmax_of_tempered_logits():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, -3.0])
    T, n = 0.7, 20000
    tokens, chosen, _, _ = _draw(logits, n, temperature=T)
    counts = torch.bincount(tokens, minlength=8).double()
    probs = torch.softmax(logits.double() / T, -1)
    assert _chi2(counts, probs) < CHI2_LIMIT
    # a sampler ignoring the temperature would be far off
    assert _chi2(counts, torch.softmax(logits.double(), -1)) > 10 * CHI2_LIMIT
    torch.testing.assert_close(chosen, torch.log_softmax(logits / T, -1)[tokens])


def assert_draws_follow(tokens, probs, kept) -> None:
    """Draws never leave the kept tokens and follow `probs` renormalized over them."""
    counts = torch.bincount(tokens, minlength=probs.numel()).double()
    mask = torch.zeros(probs.numel(), dtype=torch.bool)
    mask[kept] = True
    assert counts[~mask].sum() == 0
    renorm = torch.where(mask, probs, 0.0)
    assert _chi2(counts, renorm / renorm.sum()) < CHI2_LIMIT


def test_empirical_distribution_of_top_k_is_the_renormalized_top_k():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, -3.0])
    tokens, _, _, _ = _draw(logits, 20000, temperature=1.2, top_k=3, seed=5)
    assert_draws_follow(tokens, torch.softmax(logits.double() / 1.2, -1), kept=torch.tensor([0, 6, 1]))


def test_empirical_distribution_of_top_p_is_the_renormalized_nucleus():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, -3.0])
    probs = torch.softmax(logits.double(), -1)
    order = probs.argsort(descending=True)
    # the smallest prefix of the sorted tokens whose mass reaches top_p
    top_p = 0.75
    cum = probs[order].cumsum(0)
    k = int((cum < top_p).sum()) + 1
    kept = order[:k]
    tokens, _, _, _ = _draw(logits, 20000, top_p=top_p, seed=9)
    assert_draws_follow(tokens, probs, kept)


@pytest.mark.parametrize("top_k,top_p", [(1, 1.0), (5, 1.0), (0, 0.3), (0, 0.9), (7, 0.6), (0, 1e-6)])
def test_filters_never_pick_outside_the_kept_set_and_renormalize(top_k, top_p):
    g = torch.Generator().manual_seed(top_k * 100 + int(top_p * 1000))
    rows, V = 300, 40
    logits = torch.randn(rows, V, generator=g) * 2
    T = 0.9
    b = batch(rows, T, top_p, top_k, seeds=list(range(rows)), positions=list(range(rows)), num_top=V)
    tokens, chosen, top_ids, top_lp = sample(logits, b)
    probs = torch.softmax(logits.double() / T, -1)
    for r in range(rows):
        order = probs[r].argsort(descending=True)
        before = probs[r][order].cumsum(0) - probs[r][order]
        keep_sorted = before < top_p
        if top_k > 0:
            keep_sorted &= torch.arange(V) < top_k
        kept = set(order[keep_sorted].tolist())
        assert tokens[r].item() in kept
        reported = dict(zip(top_ids[r].tolist(), top_lp[r].tolist()))
        kept_lp = torch.tensor([reported[i] for i in kept], dtype=torch.float64)
        assert abs(kept_lp.exp().sum().item() - 1.0) < 1e-4, "kept tokens' probabilities must sum to 1"
        assert all(reported[i] == MIN_LOGPROB for i in range(V) if i not in kept)
        want = torch.log(probs[r][list(kept)] / probs[r][list(kept)].sum())
        torch.testing.assert_close(kept_lp, want, atol=1e-4, rtol=1e-4)
        assert abs(chosen[r].item() - reported[tokens[r].item()]) < 1e-6


def test_alternatives_are_sorted_and_consistent_with_the_chosen_logprob():
    g = torch.Generator().manual_seed(4)
    rows, V = 50, 30
    logits = torch.randn(rows, V, generator=g)
    b = batch(rows, [0.0] * 10 + [1.0] * 40, [1.0] * 30 + [0.8] * 20, [0] * 40 + [4] * 10,
              seeds=list(range(rows)), num_top=6)
    tokens, chosen, top_ids, top_lp = sample(logits, b)
    assert top_ids.shape == top_lp.shape == (rows, 6)
    assert (top_lp[:, :-1] >= top_lp[:, 1:]).all(), "alternatives in descending order"
    assert (chosen <= top_lp[:, 0] + 1e-6).all()
    for r in range(rows):
        ids = top_ids[r].tolist()
        assert len(set(ids)) == 6
        if tokens[r].item() in ids:
            assert abs(top_lp[r, ids.index(tokens[r].item())].item() - chosen[r].item()) < 1e-6
        else:
            assert chosen[r].item() <= top_lp[r, -1].item() + 1e-6
    # greedy rows: the chosen token is the first alternative
    assert torch.equal(top_ids[:10, 0], tokens[:10])


def test_no_alternatives_when_none_asked():
    tokens, chosen, top_ids, top_lp = sample(torch.randn(3, 10), batch(3))
    assert top_ids is None and top_lp is None
    assert tokens.shape == chosen.shape == (3,)


def test_filtered_out_logprobs_are_clamped_to_min_logprob():
    logits = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0, 0.0]])
    tokens, chosen, top_ids, top_lp = sample(logits, batch(1, 1.0, 1.0, 2, num_top=6))
    assert torch.isfinite(top_lp).all()
    assert top_lp[0, 2:].tolist() == [MIN_LOGPROB] * 4
    assert MIN_LOGPROB == -9999.0
    assert tokens.item() in (0, 1)
    assert math.isclose(math.exp(top_lp[0, 0]) + math.exp(top_lp[0, 1]), 1.0, rel_tol=1e-5)


def test_fold_seed_gives_32_bit_seeds():
    for s in [0, 1, -1, 2**32, 2**63 - 1, -(2**63), 2**70 + 5, 123456789]:
        f = fold_seed(s)
        assert 0 <= f < 2**32
    assert fold_seed(5) == 5
    assert fold_seed(2**32) != fold_seed(0)
    assert fold_seed(-1) != fold_seed(1)


def test_gumbel_noise_is_finite():
    """(seed 1, position 125, vocab id 3039) hashes to the largest 24-bit value, 2**24 - 1; adding 0.5 to it
    in float32 rounds up to 2**24, so u == 1.0 and the noise is -log(-log(1)) = +inf. Roughly one
    (row, id) pair in 2**24 is hit: with a 150k vocab, about 1 sampled token in 110."""
    g = gumbel(torch.tensor([1]), torch.tensor([125]), torch.arange(4096))
    assert torch.isfinite(g).all(), f"infinite noise at ids {(~torch.isfinite(g[0])).nonzero().flatten().tolist()}"


def test_a_hash_collision_at_the_top_of_the_range_cannot_pick_an_excluded_token():
    """With +inf noise on id 3039, sampling returns that token even at probability e**-60, and even when
    top-k excludes it (its -inf logprob + inf = nan, which argmax takes)."""
    V = 4096
    logits = torch.zeros(2, V)
    logits[:, 7] = 30.0
    logits[:, 3039] = -30.0
    b = batch(2, 1.0, 1.0, [0, 1], seeds=1, positions=125)
    tokens, chosen, _, _ = sample(logits, b)
    assert tokens[1].item() == 7, "top_k=1 must give the top token"
    assert tokens[0].item() != 3039, "a token of probability e**-60 was sampled"
