"""Every architecture served in float32 gives transformers' greedy tokens and logprobs (within 1e-3)."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import TINY_SHAPES
from tests.helpers import Server, assert_within_tolerance, compare_with_hf

PROMPTS = ["Hello there, how are you?", "the quick brown fox jumps over the lazy dog " * 8]


@pytest.mark.parametrize("shape", TINY_SHAPES)
def test_served_model_matches_transformers(tiny_models, shape):
    # a small forward budget makes the longer prompt prefill in several chunks
    server = Server("--model", tiny_models[shape], "--max-tokens-per-forward", "32")
    try:
        stats = compare_with_hf(server.url, tiny_models[shape], torch.float32, PROMPTS, max_tokens=24)
    finally:
        assert server.stop() == 0
    assert stats["tokens"] >= 24
    assert_within_tolerance(stats, torch.float32)
