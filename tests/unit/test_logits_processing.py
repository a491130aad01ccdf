"""vLLM's sampling options on the rank: the logits processor (penalties, logit_bias, min_tokens)
against its formulas, min-p, raw and processed logprobs, and greedy decoding of a tiny model with
each option against transformers' logits edited by the same formulas in float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.helpers import local_runner, prefill_plan
from tests.unit.test_sampling import batch
from toka.protocol import SeqParams, StepPlan
from workers.logits_processor import LogitsProcessor
from workers.sampling import MIN_LOGPROB, sample

V = 12


def processor(*params: SeqParams) -> LogitsProcessor:
    p = LogitsProcessor(8, V, torch.device("cpu"))
    for a in params:
        p.admit(a)
    return p


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens():
    # prompt tokens 1, 2; output so far 3
    p = processor(SeqParams(slot=0, repetition_penalty=2.0, history=[1, 2, 3], prompt_len=2))
    logits = torch.tensor([[1.0, 4.0, -4.0, 6.0] + [0.5] * (V - 4)])
    out = p.apply(logits.clone(), np.array([0]), np.array([3]))
    assert out[0, :4].tolist() == [1.0, 2.0, -8.0, 3.0]
    assert out[0, 4:].tolist() == [0.5] * (V - 4)


def test_frequency_and_presence_penalties_count_output_tokens_only():
    p = processor(SeqParams(slot=3, frequency_penalty=0.5, presence_penalty=1.0, history=[1, 4, 4, 5], prompt_len=1))
    out = p.apply(torch.zeros(1, V), np.array([3]), np.array([4]))
    want = torch.zeros(V)
    want[4], want[5] = -(0.5 * 2 + 1.0), -(0.5 + 1.0)  # token 1 is the prompt's: untouched
    assert torch.equal(out[0], want)
    p.record(np.array([3]), torch.tensor([5]))  # a new sample counts
    out = p.apply(torch.zeros(1, V), np.array([3]), np.array([5]))
    assert out[0, 5].item() == -(0.5 * 2 + 1.0)


def test_logit_bias_and_min_tokens():
    p = processor(SeqParams(slot=1, logit_bias={2: 5.0, 7: -100.0}),
                  SeqParams(slot=2, min_tokens=2, stop_token_ids=[0, 9], prompt_len=4))
    slots = np.array([2, 1])
    out = p.apply(torch.ones(2, V), slots, np.array([5, 0]))  # row 0: one output token so far
    assert out[1, 2].item() == 6.0 and out[1, 7].item() == -99.0 and out[1, 0].item() == 1.0
    assert out[0, 0].item() == out[0, 9].item() == float("-inf") and out[0, 1].item() == 1.0
    out = p.apply(torch.ones(2, V), slots, np.array([6, 0]))  # two output tokens: stops allowed
    assert torch.isfinite(out[0]).all()


def test_slots_reuse_penalty_rows_and_tables_grow_keeping_counts():
    p = processor(*[SeqParams(slot=s, presence_penalty=1.0, history=[s, s + 1], prompt_len=1) for s in range(8)])
    assert p.counts.shape[0] == 8 and not p.free_rows
    p.admit(SeqParams(slot=0))  # a sequence without penalties takes slot 0: its row is free again
    assert p.row_of[0] == -1 and len(p.free_rows) == 1 and not p.needed(np.array([0]))
    out = p.apply(torch.zeros(8, V), np.arange(8), np.zeros(8, dtype=np.int64))
    assert out[0].eq(0).all()
    for s in range(1, 8):  # each slot's own output token, s + 1
        assert out[s, s + 1].item() == -1.0 and out[s].sum().item() == -1.0
    grow = LogitsProcessor(20, V, torch.device("cpu"))
    for s in range(20):
        grow.admit(SeqParams(slot=s, frequency_penalty=1.0, history=[0, s % V], prompt_len=1))
    assert grow.counts.shape[0] == 32
    assert [grow.counts[grow.row_of[s], s % V].item() for s in range(20)] == [1] * 20


def test_raw_logprobs_are_the_models_own_at_any_temperature():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(16, 40, generator=g) * 2
    kw = dict(temperature=[0.0, 0.4, 1.0, 1.8] * 4, top_k=[0, 5] * 8, seeds=list(range(16)), num_top=4)
    raw = sample(logits, batch(16, raw_logprobs=True, **kw))
    processed = sample(logits, batch(16, raw_logprobs=False, **kw))
    assert torch.equal(raw[0], processed[0]), "the mode changes what is reported, not what is sampled"
    lp = torch.log_softmax(logits, -1)
    torch.testing.assert_close(raw[1], lp.gather(1, raw[0][:, None])[:, 0])
    want_lp, want_ids = lp.topk(4, -1)
    assert torch.equal(raw[2], want_ids)
    torch.testing.assert_close(raw[3], want_lp)


def test_min_p_keeps_tokens_at_least_min_p_times_the_most_likely():
    logits = torch.tensor([[4.0, 3.5, 2.0, 0.0, -1.0]]).log_softmax(-1).repeat(400, 1)
    tokens, _, ids, lps = sample(logits, batch(400, temperature=1.0, seeds=list(range(400)), min_p=0.5, num_top=5))
    probs = logits[0].exp()
    kept = set(torch.nonzero(probs >= 0.5 * probs.max()).flatten().tolist())
    assert kept == {0, 1} and set(tokens.tolist()) == kept
    row = dict(zip(ids[0].tolist(), lps[0].tolist()))
    assert all(row[i] == MIN_LOGPROB for i in range(5) if i not in kept)
    assert abs(sum(np.exp(row[i]) for i in kept) - 1) < 1e-5


# ---- a tiny model, greedy, against transformers --------------------------------------------------
def decode_plan(step: int, kv_len: int, ps: int) -> StepPlan:
    """Row 0 (slot 0) decodes the token at position kv_len - 1; pages are laid out as prefill_plan's."""
    new_page = (kv_len - 1) % ps == 0
    col = (kv_len - 1) // ps
    return StepPlan(step, [0], [0], [1], [kv_len], [True], 0, [], [0] * new_page, [col] * new_page, [col] * new_page)


def generate(runner, prompt: list[int], steps: int, params: SeqParams) -> list[int]:
    plan = prefill_plan(0, [prompt], runner.page_size)
    plan.admit = [params]
    out = [runner.step(plan).tokens[0]]
    for i in range(1, steps):
        out += runner.step(decode_plan(i, len(prompt) + i, runner.page_size)).tokens
    return out


def reference(model, prompt: list[int], steps: int, rep=1.0, freq=0.0, pres=0.0, bias=None, min_tokens=0, stop=()):
    """Greedy tokens with vLLM's formulas applied to transformers' logits in float64."""
    ids, out = list(prompt), []
    for _ in range(steps):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1].double()
        for t, b in (bias or {}).items():
            logits[t] += b
        if len(out) < min_tokens:
            logits[list(stop)] = float("-inf")
        counts = torch.bincount(torch.tensor(out, dtype=torch.int64), minlength=len(logits)).double()
        seen = torch.zeros(len(logits), dtype=torch.bool)
        seen[ids] = True
        logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
        logits = logits - freq * counts - pres * (counts > 0)
        out.append(int(logits.argmax()))
        ids.append(out[-1])
    return out


@pytest.fixture(scope="module")
def llama(tiny_models):
    from transformers import AutoModelForCausalLM

    path = tiny_models["tiny-llama"]
    return local_runner(path), AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


PROMPT = [(29 * i + 7) % 400 for i in range(21)]
CASES = {
    "none": ({}, {}),
    "repetition": (dict(repetition_penalty=1.8), dict(rep=1.8)),
    "frequency": (dict(frequency_penalty=1.5), dict(freq=1.5)),
    "presence": (dict(presence_penalty=2.0), dict(pres=2.0)),
    "bias": (dict(logit_bias={17: 3.0, 250: 2.5}), dict(bias={17: 3.0, 250: 2.5})),
    "all": (dict(repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=0.3, logit_bias={17: 1.0}),
            dict(rep=1.3, freq=0.4, pres=0.3, bias={17: 1.0})),
}


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_tokens_with_each_option_match_transformers(llama, case):
    runner, model = llama
    ours_kw, ref_kw = CASES[case]
    history = PROMPT if any(k.endswith("penalty") for k in ours_kw) else []
    params = SeqParams(slot=0, temperature=0.0, prompt_len=len(PROMPT), history=history, **ours_kw)
    assert generate(runner, PROMPT, 24, params) == reference(model, PROMPT, 24, **ref_kw)


def test_penalties_change_the_output(llama):
    runner, _ = llama
    plain = generate(runner, PROMPT, 24, SeqParams(slot=0, temperature=0.0))
    penalized = generate(runner, PROMPT, 24, SeqParams(slot=0, temperature=0.0, repetition_penalty=1.8,
                                                       history=PROMPT, prompt_len=len(PROMPT)))
    assert plain != penalized


def test_min_tokens_holds_back_stop_tokens(llama):
    runner, model = llama
    plain = generate(runner, PROMPT, 6, SeqParams(slot=0, temperature=0.0))
    stop = [plain[0], plain[1]]  # what greedy decoding would emit first
    params = SeqParams(slot=0, temperature=0.0, min_tokens=4, stop_token_ids=stop, prompt_len=len(PROMPT))
    got = generate(runner, PROMPT, 6, params)
    assert not set(got[:4]) & set(stop)
    assert got == reference(model, PROMPT, 6, min_tokens=4, stop=stop)
