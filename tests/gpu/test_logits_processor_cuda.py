"""The logits processor and the sampling options on CUDA: the same edits as on the CPU, and a
small model served by FlashInfer (bf16, CUDA graphs) honouring each option (CUDA only)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.unit.test_logits_processing import generate
from toka.protocol import SeqParams
from workers.logits_processor import LogitsProcessor

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

V = 1000


def test_processor_on_cuda_equals_cpu():
    g = torch.Generator().manual_seed(0)
    params = [
        SeqParams(slot=0, repetition_penalty=1.7, frequency_penalty=0.3, presence_penalty=0.2,
                  history=torch.randint(0, V, (300,), generator=g).tolist(), prompt_len=200),
        SeqParams(slot=1, logit_bias={5: 3.0, 999: -50.0}, min_tokens=4, stop_token_ids=[2, 3], prompt_len=10),
        SeqParams(slot=2),
        SeqParams(slot=3, presence_penalty=1.0, history=[1, 2, 3], prompt_len=3),
    ]
    slots, positions = np.array([3, 0, 2, 1]), np.array([3, 300, 7, 12])
    logits = torch.randn(4, V, generator=g) * 3
    out = {}
    for device in ("cpu", "cuda"):
        p = LogitsProcessor(8, V, torch.device(device))
        for a in params:
            p.admit(a)
        x = logits.to(device)
        for _ in range(3):  # each round records its argmax, as sampling does
            edited = p.apply(x.clone(), slots, positions)
            p.record(slots, edited.argmax(-1))
            positions = positions + 1
        positions = positions - 3
        out[device] = edited.cpu()
    torch.testing.assert_close(out["cuda"], out["cpu"])


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    from tests.helpers import local_runner
    from tools.make_model import make_model

    path = make_model("small-llama", tmp_path_factory.mktemp("m") / "m", dtype="bfloat16")
    return local_runner(str(path), dtype="bfloat16", device="cuda", kv_tokens=4096, max_seqs=16, cuda_graphs=True)


PROMPT = [(29 * i + 7) % 400 for i in range(21)]


def test_logit_bias_forces_a_token(runner):
    assert generate(runner, PROMPT, 12, SeqParams(slot=0, temperature=0.0, logit_bias={17: 100.0})) == [17] * 12


def test_a_large_frequency_penalty_never_repeats_a_token(runner):
    params = SeqParams(slot=0, temperature=0.0, frequency_penalty=100.0, history=PROMPT, prompt_len=len(PROMPT))
    out = generate(runner, PROMPT, 40, params)
    assert len(set(out)) == len(out)


def test_repetition_penalty_keeps_prompt_tokens_out(runner):
    params = SeqParams(slot=0, temperature=0.0, repetition_penalty=1e4, history=PROMPT, prompt_len=len(PROMPT))
    out = generate(runner, PROMPT, 16, params)
    assert not set(out) & set(PROMPT)
    assert out != generate(runner, PROMPT, 16, SeqParams(slot=0, temperature=0.0))


def test_min_tokens_holds_back_stop_tokens(runner):
    first = generate(runner, PROMPT, 1, SeqParams(slot=0, temperature=0.0))
    params = SeqParams(slot=0, temperature=0.0, min_tokens=5, stop_token_ids=first, prompt_len=len(PROMPT),
                       logit_bias={first[0]: 100.0})  # it would win every step but for min_tokens
    out = generate(runner, PROMPT, 8, params)
    assert first[0] not in out[:5] and out[5] == first[0]
