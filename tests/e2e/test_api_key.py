"""--api-key through the launcher and the official client: the right key is served, a wrong or
missing one is a 401 the client raises as AuthenticationError; health checks need none."""

from __future__ import annotations

import openai
import pytest
import requests

from tests.helpers import TINY_NAME, Server


def test_api_key_from_the_command_line(tiny_models):
    server = Server("--model", tiny_models["tiny-llama"], "--served-model-name", TINY_NAME, "--api-key", "k-123",
                    "--kv-cache-tokens", "4096", "--max-seqs", "8")
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="k-123", max_retries=0)
        assert [m.id for m in client.models.list().data] == [TINY_NAME]
        assert client.completions.create(model=TINY_NAME, prompt="hi", max_tokens=2).choices[0].text is not None
        for key in ("wrong", "k-1234"):
            with pytest.raises(openai.AuthenticationError):
                openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0).models.list()
        assert requests.post(server.url + "/tokenize", json={"prompt": "hi"}).status_code == 401
        for path in ("/health", "/version", "/metrics"):
            assert requests.get(server.url + path).status_code == 200, path
    finally:
        assert server.stop() == 0
