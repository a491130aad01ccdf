"""Does a model served by toka give the logprobs transformers gives? The test for a new model:

    MODEL=<folder or hub id> pytest tests/test_logprobs.py -k test_logprobs -s

Without MODEL it runs the embedded SmolLM2-135M-Instruct and tiny random models of every
architecture (written by tools/make_model.py), all offline. TOKA_ARGS adds launch flags (e.g.
"--dtype bfloat16 --tp 2"). The server answers chat requests with greedy decoding and logprobs;
transformers scores the same tokens in one forward pass (teacher forcing) in the server's dtype.
Tolerances: float32 must match closely (tokens identical, logprobs within 1e-3); lower precision
gets the public ones (token match >= 0.95, mean relative logprob difference <= 0.1, max absolute
difference <= 0.2).
"""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY_SHAPES
from tests.helpers import Server, assert_within_tolerance, compare_with_hf

PROMPTS = [
    "What is the capital of France?",
    "Write a short story about a robot who learns to paint.",
    "List three uses of a paperclip.",
    "Explain why the sky is blue in two sentences.",
    "Please repeat the following pattern: " + "a b c d e f g h i j k l m n o p " * 6,
]
MAX_TOKENS = 48


def models() -> list[str]:
    """MODEL, or offline: the default model and a tiny random model of every architecture."""
    if os.environ.get("MODEL"):
        return [os.environ["MODEL"]]
    return ["default", *TINY_SHAPES]


@pytest.fixture(scope="module", params=models())
def served(request):
    name = request.param
    tiny = name in TINY_SHAPES
    if name == "default" or tiny:  # fixtures only when needed: MODEL alone must work anywhere
        path = request.getfixturevalue("default_model" if name == "default" else "tiny_models")
        path = path[name] if tiny else path
    else:
        path = name
    args = shlex.split(os.environ.get("TOKA_ARGS", ""))
    if tiny:
        args += ["--max-tokens-per-forward", "32"]  # long prompts then prefill in several chunks
    server = Server("--model", path, *args)
    server.model_path = path
    yield server
    server.stop()


def server_dtype() -> torch.dtype:
    args = shlex.split(os.environ.get("TOKA_ARGS", ""))
    if "--dtype" in args:
        return getattr(torch, args[args.index("--dtype") + 1])
    return torch.bfloat16 if torch.cuda.is_available() else torch.float32


def test_logprobs(served):
    dtype = server_dtype()
    stats = compare_with_hf(served.url, served.model_path, dtype, PROMPTS, MAX_TOKENS)
    print(f"\n{served.model_path} ({dtype}): {stats}")
    if out := os.environ.get("TOKA_LOGPROBS_OUT"):  # tools/gpu.py reads the figures here
        Path(out).write_text(json.dumps(dict(model=served.model_path, dtype=str(dtype), **stats)))
    assert_within_tolerance(stats, dtype)
