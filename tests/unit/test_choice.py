"""A choice as the client sees it, without an engine: token events go into an OutputStream, the
Choice turns them into text, and Responses into bodies. Covers vLLM's stop_reason,
include_stop_str_in_output, skip_special_tokens, min_tokens against stop strings and the shape of
prompt_logprobs."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest

from tests.unit.test_detokenizer import TOK
from toka.protocol import PromptLogprobs, SamplingParams, StepResult, TopLogprobs
from toka.server import api
from toka.server.app import Choice
from toka.server.engine_client import EngineClient, OutputStream
from toka.server.responses import Responses

EOS = TOK.eos_token_id
PROMPT = TOK("the world").input_ids


class FakeEngine:
    def __init__(self):
        self.aborted: list[int] = []

    def abort(self, stream: OutputStream) -> None:
        self.aborted.append(stream.rid)


def request(stop=(), include_stop=False, skip_special=True, min_tokens=0, max_tokens=64, stop_ids=(EOS,),
            prompt_logprobs=-1, echo_logprobs=None):
    """What api.py makes of such a request (echo_logprobs: echo with that many logprobs)."""
    echo = echo_logprobs is not None
    params = SamplingParams(max_tokens=max_tokens, stop_token_ids=list(stop_ids), min_tokens=min_tokens,
                            logprobs=echo_logprobs if echo else -1,
                            prompt_logprobs=max(echo_logprobs if echo else -1, prompt_logprobs))
    return api.EngineRequest(list(PROMPT), params, 1, list(stop), echo=echo, include_stop=include_stop,
                             skip_special=skip_special, prompt_logprobs=prompt_logprobs)


def run(req: api.EngineRequest, tokens: list[int], chunk: int = 1):
    """The choice after `tokens` arrive `chunk` at a time, each group read before the next comes (as
    a route reads them); returns it, its text deltas and the engine it aborted on."""

    async def main():
        stream = OutputStream(0, len(req.prompt), len(req.prompt), req.params, each_token=True)
        choice, engine, deltas = Choice(0, stream, req, TOK), FakeEngine(), []
        reader = choice.deltas(engine)
        for i in range(0, len(tokens), chunk):
            for t in tokens[i : i + chunk]:
                if not stream.done:
                    stream._add(t, -1.0, None)
            try:
                deltas.append((await asyncio.wait_for(anext(reader), 5))[0])
            except StopAsyncIteration:
                break
        return choice, deltas, engine

    return asyncio.run(main())


def ids(text: str) -> list[int]:
    return TOK(text).input_ids


@pytest.mark.parametrize("chunk", [1, 3, 100])
def test_stop_string_is_the_stop_reason(chunk):
    tokens = ids("hello world and more")
    c, deltas, engine = run(request(stop=["world"]), tokens, chunk)
    assert (c.text, c.finish, c.stop_reason) == ("hello ", "stop", "world")
    assert "".join(deltas) == c.text and engine.aborted == [0]
    c, _, _ = run(request(stop=["world"], include_stop=True), tokens, chunk)
    assert (c.text, c.finish, c.stop_reason) == ("hello world", "stop", "world")


@pytest.mark.parametrize("chunk", [1, 4])
def test_stop_token_is_the_stop_reason(chunk):
    c, deltas, engine = run(request(), ids("hello") + [EOS] + ids(" after"), chunk)
    assert (c.text, c.finish, c.stop_reason) == ("hello", "stop", EOS)
    assert "".join(deltas) == "hello" and engine.aborted == []  # the engine ended it itself
    word = ids("hello world")[1]  # " wor"
    c, _, _ = run(request(stop_ids=[EOS, word]), ids("hello world"), chunk)
    assert (c.text, c.stop_reason) == ("hello", word)


def test_included_stop_token_adds_its_text():
    word = ids("hello world")[1]
    c, deltas, _ = run(request(stop_ids=[word], include_stop=True), ids("hello world"))
    assert (c.text, c.stop_reason) == ("hello wor", word) and "".join(deltas) == c.text
    # a special stop token has text only when special tokens are kept
    c, _, _ = run(request(include_stop=True), ids("hello") + [EOS])
    assert c.text == "hello"
    c, _, _ = run(request(include_stop=True, skip_special=False), ids("hello") + [EOS])
    assert c.text == "hello<|end|>"
    c, _, _ = run(request(skip_special=False), ids("hello") + [EOS])
    assert c.text == "hello"


def test_special_tokens_in_the_output_follow_skip_special_tokens():
    tokens = ids("a") + [EOS] + ids("b")
    c, _, _ = run(request(stop_ids=(), max_tokens=len(tokens)), tokens)
    assert c.text == "ab"
    c, _, _ = run(request(stop_ids=(), max_tokens=len(tokens), skip_special=False), tokens)
    assert c.text == "a<|end|>b"


def test_length_has_no_stop_reason():
    tokens = ids("hello world")
    c, _, _ = run(request(max_tokens=len(tokens)), tokens)
    assert (c.text, c.finish, c.stop_reason) == ("hello world", "length", None)


@pytest.mark.parametrize("chunk", [1, 2, 8])
@pytest.mark.parametrize("min_tokens,text", [(0, ""), (1, ""), (2, "ab "), (4, "ab "), (5, "ab ab "), (7, "ab ab "),
                                             (8, "ab ab ab")])
def test_stop_strings_count_from_the_token_after_min_tokens(min_tokens, text, chunk):
    """As vLLM: a stop ending in the text of one of the first min_tokens tokens does not count, one
    ending after them does, even if it began in them (one token per byte here: with min_tokens 1
    or 7, an "ab" ends in the next token)."""
    tokens = ids("ab ab ab")
    assert len(tokens) == 8
    c, _, _ = run(request(stop=["ab"], min_tokens=min_tokens, max_tokens=8), tokens, chunk)
    assert c.text == text
    assert (c.finish, c.stop_reason) == (("stop", "ab") if len(text) < 8 else ("length", None))


# ---- bodies ---------------------------------------------------------------------------------------
def body(kind, fields: dict):
    return api.decode_body(json.dumps(fields).encode(), kind)


def test_stop_reason_in_whole_responses_and_in_the_last_chunk():
    responses = Responses(TOK, "m")
    c, _, _ = run(request(stop=["world"]), ids("hello world"))
    completion = body(api.CompletionRequest, {"prompt": "x"})
    chat = body(api.ChatRequest, {"messages": [{"role": "user", "content": "x"}]})
    assert responses.full(completion, [c], chat=False)["choices"][0]["stop_reason"] == "world"
    assert responses.full(chat, [c], chat=True)["choices"][0]["stop_reason"] == "world"
    for req, chat_ in ((completion, False), (chat, True)):
        last = responses.chunk(req, c, "", 2, 2, chat_, False, "id", 0)["choices"][0]
        assert (last["finish_reason"], last["stop_reason"]) == ("stop", "world")
    c, _, _ = run(request(max_tokens=2), ids("hello world"))
    assert responses.full(completion, [c], chat=False)["choices"][0]["stop_reason"] is None


def scored_stream(req: api.EngineRequest, ranks: bool, tmp_path) -> OutputStream:
    """A stream whose prompt logprobs came through an EngineClient's token events, with 3
    alternatives per prompt token; the prompt's own token is the second most likely at position 1."""
    top = [TopLogprobs([7, PROMPT[1], 9], [-0.1, -0.5, -3.0])] + [
        TopLogprobs([t, 8, 9], [-0.2, -2.0, -4.0]) for t in PROMPT[2:]]
    lps = [-0.5] + [-0.2] * (len(PROMPT) - 2)
    rank_list = [2] + [1] * (len(PROMPT) - 2) if ranks else []

    async def main():
        cfg = SimpleNamespace(endpoint=lambda name: f"ipc://{tmp_path}/{name}", replica=0)
        client = EngineClient(cfg)
        try:
            [stream] = client.submit(req.prompt, req.params)
            client._apply(StepResult(0, [0], [EOS], [0.0], prompt=[PromptLogprobs(0, 1, lps, top, rank_list)]))
        finally:
            client.close()
        return stream

    return asyncio.run(main())


@pytest.mark.parametrize("ranks", [True, False])
def test_prompt_logprobs_shape(ranks, tmp_path):
    req = request(prompt_logprobs=2)
    stream = scored_stream(req, ranks, tmp_path)
    c = Choice(0, stream, req, TOK)
    completion = body(api.CompletionRequest, {"prompt": "x", "prompt_logprobs": 2})
    out = Responses(TOK, "m").full(completion, [c], chat=False)["choices"][0]["prompt_logprobs"]
    assert len(out) == len(PROMPT) and out[0] is None
    first = out[1]
    assert list(first) == [str(PROMPT[1]), "7"]  # the prompt token, then the 2 most likely (it is one)
    assert first[str(PROMPT[1])] == {"logprob": -0.5, "rank": 2, "decoded_token": TOK.decode([PROMPT[1]])}
    assert first["7"] == {"logprob": -0.1, "rank": 1, "decoded_token": TOK.decode([7])}
    for pos, entry in enumerate(out[2:], 2):
        token = str(PROMPT[pos])
        assert set(entry) == {token, "8"} and entry[token]["rank"] == 1 and entry["8"]["rank"] == 2
    chat = body(api.ChatRequest, {"messages": [{"role": "user", "content": "x"}], "prompt_logprobs": 2})
    whole = Responses(TOK, "m").full(chat, [c], chat=True)
    assert whole["prompt_logprobs"] == out and "prompt_logprobs" not in whole["choices"][0]


def test_prompt_logprobs_absent_unless_asked(tmp_path):
    req = request(echo_logprobs=3)  # echo's scoring, without prompt_logprobs
    c = Choice(0, scored_stream(req, True, tmp_path), req, TOK)
    completion = body(api.CompletionRequest, {"prompt": "x", "echo": True, "logprobs": 1})
    choice = Responses(TOK, "m").full(completion, [c], chat=False)["choices"][0]
    assert choice["prompt_logprobs"] is None


def test_echo_lists_only_the_alternatives_it_asked_for(tmp_path):
    """prompt_logprobs 3 and echo with logprobs 1 share one scoring of the prompt, with 3 alternatives."""
    req = request(prompt_logprobs=3, echo_logprobs=1)
    c = Choice(0, scored_stream(req, True, tmp_path), req, TOK)
    completion = body(api.CompletionRequest, {"prompt": "x", "echo": True, "logprobs": 1, "prompt_logprobs": 3})
    choice = Responses(TOK, "m").full(completion, [c], chat=False)["choices"][0]
    tops = choice["logprobs"]["top_logprobs"]
    assert tops[0] is None and all(len(t) == 1 for t in tops[1:])
    assert all(len(entry) <= 4 for entry in choice["prompt_logprobs"][1:])
