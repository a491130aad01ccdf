from __future__ import annotations

import pytest

from tests.helpers import TINY_NAME, Server
from tools.make_model import make_model

TINY_SHAPES = ["tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-mistral"]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    """Random-weight float32 models of every supported architecture, written once per session."""
    root = tmp_path_factory.mktemp("models")
    return {shape: str(make_model(shape, root / shape)) for shape in TINY_SHAPES}


@pytest.fixture(scope="session")
def default_model() -> str:
    from toka.default_model import default_model_path

    return str(default_model_path())


@pytest.fixture(scope="session")
def tiny_server(tiny_models):
    """A server of tiny-llama with a small KV cache, shared by the end-to-end tests."""
    server = Server("--model", tiny_models["tiny-llama"], "--served-model-name", TINY_NAME, "--kv-cache-tokens", "16384",
                    "--max-seqs", "64")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def default_server(default_model):
    """toka-launch as the README starts it: no --model, the embedded model under its own name (the
    fixture `default_model` converts it first)."""
    server = Server()
    yield server
    server.stop()
