"""The HTTP routes in this process, against an engine stand-in that answers every sequence with a
scripted list of tokens: model names, the small endpoints, the API key, /metrics, response edges."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import tempfile

import pytest
from aiohttp.test_utils import TestClient, TestServer
from transformers import AutoTokenizer

from toka.config import EngineConfig
from toka.protocol import TopLogprobs
from toka.server.app import Server
from toka.server.engine_client import OutputStream

# "é" is C3 A9 and "€" E2 82 AC in UTF-8; the tiny tokenizer's ids 0-255 are its single bytes, so
# each of these tokens is part of a character and decodes alone to U+FFFD
SCRIPT = [ord("h"), ord("i"), 0xC3, 0xA9, ord(" "), 0xE2, 0x82, 0xAC, ord("!")]


class ScriptedEngine:
    """What the server uses of EngineClient; each choice samples SCRIPT (up to max_tokens), one
    token per event loop pass, so that a stream sends several chunks."""

    def __init__(self):
        self.streams: dict[int, OutputStream] = {}
        self.prompt_tokens = 0
        self.dead = None
        self.stats = None
        self.live_count = 1
        self.prompts: list[list[int]] = []
        self._next_rid = 0

    def start(self):
        pass

    def replica_stats(self):
        return [(0, self.stats)] if self.stats is not None else []

    def submit(self, prompt, params, n=1, each_token=True):
        self.prompts.append(prompt)
        streams = []
        for i in range(n):
            s = OutputStream(self._next_rid, len(prompt), len(prompt) // n, params.for_choice(i), each_token)
            self._next_rid += 1
            self.streams[s.rid] = s
            streams.append(s)
            asyncio.get_running_loop().create_task(self._run(s))
        return streams

    async def _run(self, s: OutputStream):
        for token in SCRIPT:
            await asyncio.sleep(0.002)
            if s.rid not in self.streams:
                return
            top = TopLogprobs([token], [-0.25]) if s.params.logprobs > 0 else None
            if s._add(token, -0.25, top):
                break
        del self.streams[s.rid]

    def abort(self, s):
        self.streams.pop(s.rid, None)


@pytest.fixture(scope="module")
def model(tiny_models):
    return tiny_models["tiny-llama"]


@pytest.fixture(scope="module")
def tokenizer(model):
    return AutoTokenizer.from_pretrained(model)


def serve(model, tokenizer, check, **fields):
    """Runs `await check(client, server)` against a server of `model` with these config fields (its
    batch store in a folder of its own: never a developer's default one)."""
    fields.setdefault("data_dir", tempfile.mkdtemp(prefix="toka-routes-"))
    cfg = EngineConfig(model=model, **fields).resolve()

    async def main():
        server = Server(cfg, tokenizer, ScriptedEngine())
        server.start()
        async with TestClient(TestServer(server.app())) as client:
            await check(client, server)

    asyncio.run(main())


def completion(**kw):
    return {"prompt": "hello", "max_tokens": len(SCRIPT), **kw}


def chat(**kw):
    return {"messages": [{"role": "user", "content": "hello"}], "max_tokens": len(SCRIPT), **kw}


async def events(resp) -> list[dict]:
    text = await resp.text()
    data = [line.removeprefix("data: ") for line in text.split("\n\n") if line]
    assert data[-1] == "[DONE]", text
    return [json.loads(d) for d in data[:-1]]


def error_of(body: dict) -> dict:
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


# ---- model names -------------------------------------------------------------------------------
def test_a_model_not_served_is_404_model_not_found(model, tokenizer):
    async def check(client, server):
        names = server.cfg.served_names
        for path, body in (("/v1/completions", completion()), ("/v1/chat/completions", chat())):
            resp = await client.post(path, json={**body, "model": "gpt-4o"})
            assert resp.status == 404, path
            err = error_of(await resp.json())
            assert err["code"] == err["type"] == "model_not_found" and err["param"] == "model", err
            assert "gpt-4o" in err["message"]
            for name in (None, *names):  # omitted, and every served name
                resp = await client.post(path, json=body if name is None else {**body, "model": name})
                assert resp.status == 200, (path, name, await resp.text())
                assert (await resp.json())["model"] == server.cfg.model_name

    serve(model, tokenizer, check)


def test_models_lists_every_served_name_and_answers_each_by_id(model, tokenizer):
    async def check(client, server):
        names = server.cfg.served_names
        listed = await (await client.get("/v1/models")).json()
        assert [m["id"] for m in listed["data"]] == names and "/" in names[0]  # a path: slashes
        assert all(m["object"] == "model" and m["max_model_len"] == server.cfg.max_model_len for m in listed["data"])
        for name in names:
            resp = await client.get(f"/v1/models/{name}")
            assert resp.status == 200 and (await resp.json())["id"] == name
        resp = await client.get("/v1/models/gpt-4o")
        assert resp.status == 404 and error_of(await resp.json())["code"] == "model_not_found"

    serve(model, tokenizer, check)


def test_every_alias_is_served_and_listed_and_responses_report_the_first(model, tokenizer):
    async def check(client, server):
        listed = await (await client.get("/v1/models")).json()
        assert [m["id"] for m in listed["data"]] == ["tiny", "org/alias"]
        for name in ("tiny", "org/alias"):  # a hub-style name has a slash
            resp = await client.get(f"/v1/models/{name}")
            assert resp.status == 200 and (await resp.json())["id"] == name
            resp = await client.post("/v1/completions", json=completion(model=name))
            assert resp.status == 200 and (await resp.json())["model"] == "tiny"
        resp = await client.post("/v1/chat/completions", json=chat(model=model))  # the path is no alias now
        assert resp.status == 404 and error_of(await resp.json())["code"] == "model_not_found"

    serve(model, tokenizer, check, served_model_name=["tiny", "org/alias"])


# ---- /tokenize, /detokenize, /version ----------------------------------------------------------
def test_tokenize_a_prompt_and_chat_messages(model, tokenizer):
    async def check(client, server):
        max_len = server.cfg.max_model_len
        resp = await client.post("/tokenize", json={"prompt": "the cat sat"})
        assert await resp.json() == {"tokens": tokenizer("the cat sat").input_ids,
                                     "count": len(tokenizer("the cat sat").input_ids), "max_model_len": max_len}
        bare = await (await client.post("/tokenize", json={"prompt": "the cat sat", "add_special_tokens": False})).json()
        assert bare["tokens"] == tokenizer("the cat sat", add_special_tokens=False).input_ids
        # the chat form: exactly the prompt the chat route generates from
        messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
        got = await (await client.post("/tokenize", json={"messages": messages})).json()
        assert (await client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 1})).status == 200
        assert got["tokens"] == server.engine.prompts[-1] and got["count"] == len(got["tokens"])
        assert tokenizer.decode(got["tokens"]).count("hello") == 1
        for body, param in (({}, "prompt"), ({"prompt": "x", "messages": messages}, "prompt"),
                            ({"prompt": 3}, "prompt"), ({"messages": [{"role": "bot", "content": "x"}]}, "messages")):
            resp = await client.post("/tokenize", json=body)
            assert resp.status == 400 and error_of(await resp.json())["param"] == param, body

    serve(model, tokenizer, check)


def test_detokenize_and_ids_outside_the_vocabulary(model, tokenizer):
    async def check(client, server):
        ids = tokenizer("the cat sat", add_special_tokens=False).input_ids
        resp = await client.post("/detokenize", json={"tokens": ids})
        assert resp.status == 200 and await resp.json() == {"prompt": "the cat sat"}
        for bad in ([server.cfg.vocab_size], [-1], "abc"):
            resp = await client.post("/detokenize", json={"tokens": bad})
            assert resp.status == 400 and error_of(await resp.json())["param"] == "tokens", bad

    serve(model, tokenizer, check)


def test_version_is_the_package_version(model, tokenizer):
    from importlib.metadata import version

    async def check(client, server):
        resp = await client.get("/version")
        assert resp.status == 200 and await resp.json() == {"version": version("toka")}

    serve(model, tokenizer, check)


# ---- the API key -------------------------------------------------------------------------------
GUARDED = [("post", "/v1/completions", completion()), ("post", "/v1/chat/completions", chat()),
           ("get", "/v1/models", None), ("post", "/tokenize", {"prompt": "x"}), ("post", "/detokenize", {"tokens": [1]})]


def test_api_key_guards_v1_tokenize_and_detokenize(model, tokenizer):
    async def check(client, server):
        for method, path, body in GUARDED:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "secret"}):
                resp = await client.request(method, path, json=body, headers=headers)
                assert resp.status == 401, (path, headers)
                assert error_of(await resp.json())["code"] == "invalid_api_key"
            resp = await client.request(method, path, json=body, headers={"Authorization": "Bearer secret"})
            assert resp.status == 200, (path, await resp.text())
        for path in ("/health", "/metrics", "/version"):
            assert (await client.get(path)).status == 200, path

    serve(model, tokenizer, check, api_key="secret")


def test_api_key_comes_from_the_environment(model, tokenizer, monkeypatch):
    monkeypatch.setenv("TOKA_API_KEY", "from-env")

    async def check(client, server):
        assert (await client.get("/v1/models")).status == 401
        assert (await client.get("/v1/models", headers={"Authorization": "Bearer from-env"})).status == 200

    serve(model, tokenizer, check)


# ---- /metrics ----------------------------------------------------------------------------------
def parse(text: str) -> dict[str, float]:
    return {k: float(v) for k, v in re.findall(r"^(toka_\S+) (\S+)$", text, re.MULTILINE)}


def test_latency_histograms_and_token_counters(model, tokenizer):
    async def check(client, server):
        prompt = tokenizer("hello").input_ids
        assert (await client.post("/v1/completions", json=completion(n=2))).status == 200
        assert len(await events(await client.post("/v1/completions", json=completion(max_tokens=1, stream=True)))) == 1
        text = await (await client.get("/metrics")).text()
        m = parse(text)
        assert m["toka_prompt_tokens_total"] == 2 * len(prompt)  # once for the n=2 request's prompt
        assert m["toka_generation_tokens_total"] == 2 * len(SCRIPT) + 1
        for name, count in (("time_to_first_token_seconds", 3), ("e2e_request_latency_seconds", 3),
                            ("inter_token_latency_seconds", 2 * (len(SCRIPT) - 1))):  # the 1-token choice has no gap
            full = f"toka_{name}"
            assert f"# TYPE {full} histogram" in text and f"# HELP {full} " in text
            buckets = [(float(le), float(v)) for le, v in re.findall(rf'^{full}_bucket{{le="([^"]+)"}} (\S+)$', text, re.MULTILINE)]
            assert len(buckets) >= 10 and buckets[-1][0] == float("inf") and buckets[-1][1] == m[f"{full}_count"] == count
            assert all(a[0] < b[0] and a[1] <= b[1] for a, b in itertools.pairwise(buckets)), buckets  # cumulative
            assert 0 < m[f"{full}_sum"] < 5 * count
        # each scripted token comes a loop pass (>= 2 ms) after the last
        assert m["toka_inter_token_latency_seconds_sum"] / m["toka_inter_token_latency_seconds_count"] >= 0.002
        assert m["toka_e2e_request_latency_seconds_sum"] > m["toka_time_to_first_token_seconds_sum"]

    serve(model, tokenizer, check)


def test_counters_end_in_total(model, tokenizer):
    async def check(client, server):
        assert (await client.post("/v1/completions", json={"prompt": "x", "max_tokens": -1})).status == 400
        text = await (await client.get("/metrics")).text()
        counters = re.findall(r"^# TYPE (\S+) counter$", text, re.MULTILINE)
        assert "toka_http_errors_total" in counters and "toka_requests_finished_total" in counters
        assert all(c.endswith("_total") for c in counters), counters
        assert parse(text)['toka_http_errors_total{status="400"}'] == 1

    serve(model, tokenizer, check)


# ---- edges -------------------------------------------------------------------------------------
def test_a_body_over_the_limit_is_413_with_an_openai_body(model, tokenizer):
    async def check(client, server):
        resp = await client.post("/v1/completions", json=completion(prompt="x" * 2000))
        assert resp.status == 413
        assert "1000" in error_of(await resp.json())["message"]
        assert (await client.post("/v1/completions", json=completion())).status == 200

    serve(model, tokenizer, check, max_body_bytes=1000)


def test_streamed_text_offset_counts_from_the_start_of_the_text(model, tokenizer):
    async def check(client, server):
        for echo in (False, True):
            body = completion(logprobs=1, echo=echo)
            whole = (await (await client.post("/v1/completions", json=body)).json())["choices"][0]["logprobs"]
            chunks = await events(await client.post("/v1/completions", json={**body, "stream": True}))
            assert len(chunks) > 2
            offsets = [o for c in chunks for o in c["choices"][0]["logprobs"]["text_offset"]]
            assert offsets == whole["text_offset"] and offsets == sorted(offsets) and offsets[-1] > 0, echo

    serve(model, tokenizer, check)


def test_chat_logprob_bytes_are_each_tokens_own_bytes(model, tokenizer):
    async def check(client, server):
        resp = await (await client.post("/v1/chat/completions", json=chat(logprobs=True, top_logprobs=1))).json()
        content = resp["choices"][0]["logprobs"]["content"]
        assert [e["bytes"] for e in content] == [[t] for t in SCRIPT]
        assert [e["top_logprobs"][0]["bytes"] for e in content] == [[t] for t in SCRIPT]
        assert bytes(b for e in content for b in e["bytes"]).decode() == resp["choices"][0]["message"]["content"]
        # tokens stay in the vocabulary's form, which maps back to the ids
        assert tokenizer.convert_tokens_to_ids([e["token"] for e in content]) == SCRIPT
        chunks = await events(await client.post("/v1/chat/completions", json=chat(logprobs=True, stream=True)))
        streamed = [e["bytes"] for c in chunks for e in c["choices"][0]["logprobs"]["content"]]
        assert streamed == [[t] for t in SCRIPT]

    serve(model, tokenizer, check)

