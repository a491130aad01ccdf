"""Request bodies: decoding, validation (400 naming the field) and translation into SamplingParams."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from toka.server import api
from toka.server.api import APIError, Limits

VOCAB = 100
CTX = 64
EOS = [2, 3]


class FakeTokenizer:
    """One token per character (ids in [10, 100)), plus a BOS of 1 when special tokens are added."""

    def __call__(self, text, add_special_tokens=True):
        ids = [10 + ord(c) % 90 for c in text]
        return SimpleNamespace(input_ids=([1] if add_special_tokens and text else []) + ids)

    def apply_chat_template(self, messages, add_generation_prompt=False, continue_final_message=False,
                            tokenize=True, **variables):
        """Each turn is "<role>content."; a `think` variable adds "<think>" to the generation prompt,
        as Qwen3's enable_thinking does."""
        assert tokenize is False
        for m in messages:
            if m["content"] == "RAISE":
                raise ValueError("the template rejects this")
        text = "".join(f"<{m['role']}>{m['content']}." for m in messages)
        if continue_final_message:  # what transformers does: the text ends with the last message's
            text = text.removesuffix(".")
        return text + ("<assistant>" + ("<think>" if variables.get("think") else "") if add_generation_prompt else "")


TOK = FakeTokenizer()


def limits(**defaults) -> Limits:
    return Limits(vocab_size=VOCAB, max_model_len=CTX, eos_token_ids=list(EOS), sampling_defaults=defaults)


def completion(body, lim=None, seed=1234):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = api.decode_body(raw, api.CompletionRequest)
    return api.completion_requests(req, TOK, lim or limits(), seed)


def chat(body, lim=None, seed=1234):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = api.decode_body(raw, api.ChatRequest)
    return api.chat_request(req, TOK, lim or limits(), seed)


def msgs(*contents, role="user"):
    return [{"role": role, "content": c} for c in contents]


def assert_400(fn, body, param):
    with pytest.raises(APIError) as e:
        fn(body)
    assert e.value.status == 400
    assert e.value.param == param, e.value.message
    b = e.value.body()["error"]
    assert b["param"] == param and b["type"] == "invalid_request_error" and b["message"]


# ---- completions: bad fields ----------------------------------------------------------------------
BAD_COMPLETIONS = [
    ({"prompt": "hi", "temperature": -0.1}, "temperature"),
    ({"prompt": "hi", "top_p": 0}, "top_p"),
    ({"prompt": "hi", "top_p": 0.0}, "top_p"),
    ({"prompt": "hi", "top_p": 1.01}, "top_p"),
    ({"prompt": "hi", "top_p": -0.5}, "top_p"),
    ({"prompt": "hi", "top_k": -2}, "top_k"),
    ({"prompt": "hi", "top_k": VOCAB + 1}, "top_k"),
    ({"prompt": "hi", "n": 0}, "n"),
    ({"prompt": "hi", "n": -1}, "n"),
    ({"prompt": "hi", "n": api.MAX_N + 1}, "n"),
    ({"prompt": "hi", "logprobs": 21}, "logprobs"),
    ({"prompt": "hi", "logprobs": -1}, "logprobs"),
    ({"prompt": [1, 2, VOCAB]}, "prompt"),
    ({"prompt": [1, -1, 2]}, "prompt"),
    ({"prompt": [[1, 2], [3, VOCAB + 5]]}, "prompt"),
    ({"prompt": "x" * 60, "max_tokens": 10}, "max_tokens"),  # 61 tokens + 10 > 64
    ({"prompt": list(range(10, 60)), "max_tokens": 15}, "max_tokens"),
    ({"prompt": "x" * 70, "max_tokens": 1}, "prompt"),  # the prompt alone is over the window
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [[]]}, "prompt"),
    ({"prompt": ["ok", ""]}, "prompt"),
    ({"prompt": "hi", "max_tokens": -1}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),  # only with echo
    ({"prompt": "hi", "stop_token_ids": [VOCAB]}, "stop_token_ids"),
    ({"prompt": "hi", "stop_token_ids": [-1]}, "stop_token_ids"),
    ({"prompt": "hi", "stop": ""}, "stop"),
    ({"prompt": "hi", "stop": ["a", ""]}, "stop"),
    ({"prompt": "hi", "stop": ["s"] * (api.MAX_STOP + 1)}, "stop"),
    ({"prompt": "hi", "suffix": "tail"}, "suffix"),
    ({"prompt": "hi", "best_of": 3}, "best_of"),
    ({"prompt": "hi", "presence_penalty": 2.5}, "presence_penalty"),
    ({"prompt": "hi", "logit_bias": {str(VOCAB): 1.0}}, "logit_bias"),
    ({"prompt": ["a", 5]}, "prompt"),  # strings and ids mixed
    ({"prompt": [5, "a"]}, "prompt"),
]


@pytest.mark.parametrize("body,param", BAD_COMPLETIONS, ids=[f"{p}-{i}" for i, (_, p) in enumerate(BAD_COMPLETIONS)])
def test_bad_completion_fields(body, param):
    assert_400(completion, body, param)


WRONG_TYPES = [
    ({"prompt": "hi", "temperature": "hot"}, "temperature"),
    ({"prompt": "hi", "top_p": [1]}, "top_p"),
    ({"prompt": "hi", "top_k": 1.5}, "top_k"),
    ({"prompt": "hi", "n": "2"}, "n"),
    ({"prompt": "hi", "max_tokens": "10"}, "max_tokens"),
    ({"prompt": "hi", "logprobs": True}, "logprobs"),
    ({"prompt": "hi", "stream": "yes"}, "stream"),
    ({"prompt": "hi", "stop": 5}, "stop"),
    ({"prompt": "hi", "seed": 1.5}, "seed"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": {"text": "hi"}}, "prompt"),
    ({"prompt": [5, True]}, "prompt"),  # JSON true is no token id
    ({"prompt": [[5, 6], [7, False]]}, "prompt"),
]


@pytest.mark.parametrize("body,param", WRONG_TYPES, ids=[p for _, p in WRONG_TYPES])
def test_wrong_types_name_the_field(body, param):
    with pytest.raises(APIError) as e:
        completion(body)
    assert e.value.status == 400
    assert e.value.param is not None and e.value.param.split("[")[0] == param, e.value.message


def test_wrong_type_in_a_list_names_the_element():
    with pytest.raises(APIError) as e:
        completion({"prompt": [1, 2.5]})
    assert e.value.status == 400 and e.value.param.startswith("prompt")


@pytest.mark.parametrize("raw", [b"", b"{", b"not json", b'{"prompt": "hi",}', b"\xff\xfe"])
def test_empty_or_malformed_body(raw):
    for fn in (completion, chat):
        with pytest.raises(APIError) as e:
            fn(raw)
        assert e.value.status == 400 and e.value.param is None
        assert e.value.message


def test_body_that_is_not_an_object():
    with pytest.raises(APIError) as e:
        completion(b"[1, 2]")
    assert e.value.status == 400


def test_missing_required_field():
    with pytest.raises(APIError) as e:
        completion({"max_tokens": 5})
    assert e.value.status == 400 and "prompt" in e.value.message
    with pytest.raises(APIError) as e:
        chat({"max_tokens": 5})
    assert e.value.status == 400 and "messages" in e.value.message


# ---- completions: good requests ----------------------------------------------------------------------
def test_completion_defaults_come_from_the_model():
    lim = limits(temperature=0.6, top_p=0.9, top_k=20)
    [r] = completion({"prompt": "hello"}, lim, seed=77)
    p = r.params
    assert (p.temperature, p.top_p, p.top_k) == (pytest.approx(0.6), pytest.approx(0.9), 20)
    assert p.max_tokens == 16 and p.seed == 77 and p.logprobs == -1 and p.prompt_logprobs == -1
    assert p.stop_token_ids == EOS
    assert r.prompt == TOK("hello").input_ids and r.n == 1 and r.stop == [] and not r.echo


def test_explicit_values_override_model_defaults_even_zero():
    lim = limits(temperature=0.6, top_p=0.9, top_k=20)
    [r] = completion({"prompt": "hello", "temperature": 0, "top_p": 1, "top_k": -1}, lim)
    assert (r.params.temperature, r.params.top_p, r.params.top_k) == (0.0, 1.0, 0)


def test_defaults_without_model_defaults():
    [r] = completion({"prompt": "hi"})
    assert (r.params.temperature, r.params.top_p, r.params.top_k) == (1.0, 1.0, 0)


def test_ignore_eos_removes_eos_but_keeps_requested_stop_ids():
    [r] = completion({"prompt": "hi", "ignore_eos": True})
    assert r.params.stop_token_ids == []
    [r] = completion({"prompt": "hi", "ignore_eos": True, "stop_token_ids": [7, 8]})
    assert r.params.stop_token_ids == [7, 8]
    [r] = completion({"prompt": "hi", "stop_token_ids": [7, 2]})
    assert sorted(r.params.stop_token_ids) == [2, 3, 7] and len(r.params.stop_token_ids) == 3


def test_prompt_forms():
    reqs = completion({"prompt": ["ab", "cde"], "n": 2, "stop": "x", "logprobs": 3})
    assert [r.prompt for r in reqs] == [TOK("ab").input_ids, TOK("cde").input_ids]
    assert all(r.n == 2 and r.stop == ["x"] and r.params.logprobs == 3 for r in reqs)
    [r] = completion({"prompt": [5, 6, 7]})
    assert r.prompt == [5, 6, 7]
    reqs = completion({"prompt": [[5], [6, 7]]})
    assert [r.prompt for r in reqs] == [[5], [6, 7]]


def test_boundaries_are_accepted():
    [r] = completion({"prompt": list(range(10, 58)), "max_tokens": 16, "top_k": VOCAB, "top_p": 1.0,
                      "logprobs": 20, "n": api.MAX_N, "temperature": 0, "stop": ["s"] * api.MAX_STOP})
    assert r.params.max_tokens == 16 and r.params.top_k == VOCAB and r.params.logprobs == 20
    [r] = completion({"prompt": "hi", "logprobs": 0, "top_k": 0, "stop_token_ids": [0, VOCAB - 1]})
    assert r.params.logprobs == 0


def test_echo_with_max_tokens_zero_asks_for_prompt_logprobs():
    [r] = completion({"prompt": [5] * CTX, "max_tokens": 0, "echo": True, "logprobs": 2})
    assert r.echo and r.params.max_tokens == 0 and r.params.prompt_logprobs == 2 and r.params.logprobs == 2
    [r] = completion({"prompt": "hi", "echo": True})
    assert r.params.prompt_logprobs == -1


def test_completion_max_tokens_null_fills_the_window():
    [r] = completion({"prompt": [5] * 10, "max_tokens": None})
    assert r.params.max_tokens == CTX - 10


def test_completion_prompt_filling_the_window_with_max_tokens_null_names_a_completion_field():
    with pytest.raises(APIError) as e:
        completion({"prompt": [5] * CTX, "max_tokens": None})
    assert e.value.status == 400
    assert e.value.param in ("prompt", "max_tokens"), f"a completion request has no {e.value.param!r} field"


# ---- chat -------------------------------------------------------------------------------------------
BAD_CHATS = [
    ({"messages": msgs("hi"), "temperature": -1}, "temperature"),
    ({"messages": msgs("hi"), "top_p": 0}, "top_p"),
    ({"messages": msgs("hi"), "top_p": 2}, "top_p"),
    ({"messages": msgs("hi"), "top_k": -5}, "top_k"),
    ({"messages": msgs("hi"), "n": 0}, "n"),
    ({"messages": []}, "messages"),
    ({"messages": msgs("hi", role="wizard")}, "messages"),
    ({"messages": msgs("hi") + msgs("x", role="bot")}, "messages"),
    ({"messages": msgs("hi"), "top_logprobs": 2}, "top_logprobs"),
    ({"messages": msgs("hi"), "logprobs": False, "top_logprobs": 2}, "top_logprobs"),
    ({"messages": msgs("hi"), "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"messages": msgs("hi"), "logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    ({"messages": msgs("hi"), "max_tokens": 0}, "max_tokens"),
    ({"messages": msgs("hi"), "max_completion_tokens": 0}, "max_tokens"),
    ({"messages": msgs("hi"), "max_tokens": 60}, "max_tokens"),
    ({"messages": msgs("hi"), "stop_token_ids": [VOCAB]}, "stop_token_ids"),
    ({"messages": msgs("hi"), "tools": [{"type": "function"}]}, "tools"),
    ({"messages": msgs("hi"), "response_format": {"type": "json_object"}}, "response_format"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages"),
    ({"messages": msgs("RAISE")}, "messages"),
    ({"messages": msgs("hi"), "stop": [""]}, "stop"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"content": "no role"}]}, "messages[0]"),
]


@pytest.mark.parametrize("body,param", BAD_CHATS, ids=[f"{p}-{i}" for i, (_, p) in enumerate(BAD_CHATS)])
def test_bad_chat_fields(body, param):
    with pytest.raises(APIError) as e:
        chat(body)
    assert e.value.status == 400
    assert e.value.param is not None and e.value.param.startswith(param), (e.value.param, e.value.message)


def test_chat_prompt_over_the_window_names_messages():
    with pytest.raises(APIError) as e:
        chat({"messages": msgs("x" * 80)})
    assert e.value.status == 400
    assert e.value.param == "messages", f"a chat request has no {e.value.param!r} field"


def test_chat_prompt_filling_the_window_exactly():
    text_len = CTX - len("<user>.<assistant>")
    with pytest.raises(APIError) as e:
        chat({"messages": msgs("x" * text_len)})
    assert e.value.param == "messages"
    r = chat({"messages": msgs("x" * (text_len - 1))})
    assert r.params.max_tokens == 1


def test_chat_translation():
    lim = limits(temperature=0.7)
    r = chat({"messages": msgs("hi", role="system") + msgs("yo"), "logprobs": True, "top_logprobs": 4,
              "max_tokens": 5, "stop": "END", "n": 3, "seed": 9, "ignore_eos": True}, lim, seed=9)
    text = TOK.apply_chat_template([{"role": "system", "content": "hi"}, {"role": "user", "content": "yo"}],
                                   add_generation_prompt=True, tokenize=False)
    assert r.prompt == TOK(text, add_special_tokens=False).input_ids
    p = r.params
    assert (p.max_tokens, p.logprobs, p.prompt_logprobs, p.seed) == (5, 4, -1, 9)
    assert p.temperature == pytest.approx(0.7) and p.stop_token_ids == []
    assert r.stop == ["END"] and r.n == 3 and not r.echo


def test_chat_defaults():
    r = chat({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]})
    assert r.params.logprobs == -1
    assert r.params.max_tokens == CTX - len(r.prompt)  # unset: the room the window leaves
    assert r.params.stop_token_ids == EOS
    r = chat({"messages": msgs("a"), "logprobs": True})
    assert r.params.logprobs == 0
    r = chat({"messages": msgs("a"), "max_tokens": 3, "max_completion_tokens": 7})
    assert r.params.max_tokens == 7
    r = chat({"messages": msgs(None, role="assistant") + msgs("q")})
    assert r.params.max_tokens > 0
