"""Does a model served by toka give the logprobs transformers gives? The test for a new model:

    MODEL=<folder or hub id> pytest tests/test_logprobs.py -k test_logprobs -s

MODEL defaults to the embedded SmolLM2-135M-Instruct. TOKA_ARGS adds launch flags (e.g.
"--dtype bfloat16 --tp 2"). The server answers chat requests with greedy decoding and logprobs;
transformers scores the same tokens in one forward pass (teacher forcing) in the server's dtype.
Tolerances: float32 must match closely (tokens identical, logprobs within 1e-3); lower precision
gets the public ones (token match >= 0.95, mean relative logprob difference <= 0.1, max absolute
difference <= 0.2).
"""

from __future__ import annotations

import os
import shlex

import pytest
import torch

from tests.helpers import Server, assert_within_tolerance, compare_with_hf

PROMPTS = [
    "What is the capital of France?",
    "Write a short story about a robot who learns to paint.",
    "List three uses of a paperclip.",
    "Explain why the sky is blue in two sentences.",
]
MAX_TOKENS = 48


def model_path() -> str:
    if os.environ.get("MODEL"):
        return os.environ["MODEL"]
    from toka.default_model import default_model_path

    return str(default_model_path())


@pytest.fixture(scope="module")
def served():
    args = shlex.split(os.environ.get("TOKA_ARGS", ""))
    server = Server("--model", model_path(), *args)
    yield server
    server.stop()


def server_dtype(server: Server) -> torch.dtype:
    args = shlex.split(os.environ.get("TOKA_ARGS", ""))
    if "--dtype" in args:
        return getattr(torch, args[args.index("--dtype") + 1])
    return torch.bfloat16 if torch.cuda.is_available() else torch.float32


def test_logprobs(served):
    dtype = server_dtype(served)
    stats = compare_with_hf(served.url, model_path(), dtype, PROMPTS, MAX_TOKENS)
    print(f"\n{model_path()} ({dtype}): {stats}")
    assert_within_tolerance(stats, dtype)
