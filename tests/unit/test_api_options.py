"""vLLM's request options: sampling fields that reach SamplingParams, output options that reach the
EngineRequest, chat-template inputs, unknown fields (ignored and logged once) and the 400s naming
each field that is out of range or asks for what the engine does not serve."""

from __future__ import annotations

import json
import logging
import uuid

import pytest

from tests.unit.test_api import CTX, TOK, VOCAB, assert_400, chat, completion, msgs
from toka.protocol import SamplingParams
from toka.server import api
from toka.server.api import APIError

HI = msgs("hi")

# ---- sampling fields -------------------------------------------------------------------------------
BAD_SAMPLING = [
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"repetition_penalty": -1.0}, "repetition_penalty"),
    ({"frequency_penalty": 2.01}, "frequency_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"presence_penalty": -2.5}, "presence_penalty"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"min_p": -0.1}, "min_p"),
    ({"min_p": 1.5}, "min_p"),
    ({"min_tokens": -1}, "min_tokens"),
    ({"min_tokens": 6, "max_tokens": 5}, "min_tokens"),
    ({"logit_bias": {str(VOCAB): 1.0}}, "logit_bias"),
    ({"logit_bias": {"-1": 1.0}}, "logit_bias"),
    ({"logit_bias": {"hello": 1.0}}, "logit_bias"),
    ({"logit_bias": {"1.5": 1.0}}, "logit_bias"),
    ({"logit_bias": {" 5": 1.0}}, "logit_bias"),
    ({"logit_bias": {"5": 100.5}}, "logit_bias"),
    ({"logit_bias": {"5": -101}}, "logit_bias"),
    ({"logit_bias": {"5": "up"}}, "logit_bias"),
    ({"logit_bias": [5]}, "logit_bias"),
    ({"repetition_penalty": "high"}, "repetition_penalty"),
    ({"min_tokens": 1.5}, "min_tokens"),
    ({"prompt_logprobs": 21}, "prompt_logprobs"),
    ({"prompt_logprobs": -1}, "prompt_logprobs"),
    ({"prompt_logprobs": 2, "stream": True}, "prompt_logprobs"),  # as vLLM
    ({"include_stop_str_in_output": "yes"}, "include_stop_str_in_output"),
    ({"skip_special_tokens": 0}, "skip_special_tokens"),
]


def _ids(cases):
    return [f"{p}-{i}" for i, (_, p) in enumerate(cases)]


@pytest.mark.parametrize("fields,param", BAD_SAMPLING, ids=_ids(BAD_SAMPLING))
def test_bad_sampling_field_is_a_400_naming_it(fields, param):
    assert_400(completion, {"prompt": "hi", **fields}, param)
    assert_400(chat, {"messages": HI, **fields}, param)


def test_sampling_fields_reach_sampling_params():
    fields = {"repetition_penalty": 1.3, "frequency_penalty": -0.5, "presence_penalty": 2, "min_p": 0.05,
              "min_tokens": 4, "logit_bias": {"7": 5.5, "0": -100, str(VOCAB - 1): 100}, "max_tokens": 10}
    want = {"repetition_penalty": 1.3, "frequency_penalty": -0.5, "presence_penalty": 2.0, "min_p": 0.05,
            "min_tokens": 4, "logit_bias": {7: 5.5, 0: -100.0, VOCAB - 1: 100.0}, "max_tokens": 10}
    [r] = completion({"prompt": "hi", **fields})
    c = chat({"messages": HI, **fields})
    for p in (r.params, c.params):
        assert {k: getattr(p, k) for k in want} == want
        assert p.penalized
        assert all(isinstance(k, int) for k in p.logit_bias)


def test_defaults_and_nulls_change_nothing():
    nulls = {"repetition_penalty": None, "frequency_penalty": None, "presence_penalty": None, "min_p": None,
             "logit_bias": None, "prompt_logprobs": None}
    default = SamplingParams(max_tokens=1)
    for body in ({"prompt": "hi"}, {"prompt": "hi", **nulls}, {"prompt": "hi", "logit_bias": {}, "min_tokens": 0}):
        [r] = completion(body)
        p = r.params
        assert (p.repetition_penalty, p.frequency_penalty, p.presence_penalty, p.min_p, p.min_tokens, p.logit_bias) == (
            default.repetition_penalty, default.frequency_penalty, default.presence_penalty, default.min_p,
            default.min_tokens, default.logit_bias)
        assert not p.penalized and p.prompt_logprobs == -1
        assert (r.include_stop, r.skip_special, r.prompt_logprobs) == (False, True, -1)
    assert not chat({"messages": HI, **nulls}).params.penalized


def test_min_tokens_bounds():
    [r] = completion({"prompt": "hi", "min_tokens": 5, "max_tokens": 5})
    assert r.params.min_tokens == 5
    c = chat({"messages": HI, "min_tokens": 3})  # max_tokens unset: bounded by the room left
    assert c.params.min_tokens == 3
    with pytest.raises(APIError) as e:
        chat({"messages": HI, "min_tokens": CTX})
    assert e.value.param == "min_tokens"
    assert_400(completion, {"prompt": "hi", "echo": True, "max_tokens": 0, "min_tokens": 1}, "min_tokens")


# ---- output options --------------------------------------------------------------------------------
def test_output_options_reach_the_engine_request():
    body = {"include_stop_str_in_output": True, "skip_special_tokens": False, "stop": ["x"]}
    [r] = completion({"prompt": "hi", **body})
    c = chat({"messages": HI, **body})
    for e in (r, c):
        assert e.include_stop and not e.skip_special and e.stop == ["x"]


def test_prompt_logprobs_ask_the_engine_to_score_the_prompt():
    [r] = completion({"prompt": "hi", "prompt_logprobs": 3})
    assert r.prompt_logprobs == 3 and r.params.prompt_logprobs == 3 and r.params.logprobs == -1
    c = chat({"messages": HI, "prompt_logprobs": 0})
    assert c.prompt_logprobs == 0 and c.params.prompt_logprobs == 0
    # echo's logprobs and prompt_logprobs share one scoring, with the larger count of alternatives
    [r] = completion({"prompt": "hi", "echo": True, "logprobs": 2, "prompt_logprobs": 5})
    assert r.params.prompt_logprobs == 5 and r.params.logprobs == 2 and r.prompt_logprobs == 5
    [r] = completion({"prompt": "hi", "echo": True, "logprobs": 4, "prompt_logprobs": 1})
    assert r.params.prompt_logprobs == 4 and r.prompt_logprobs == 1
    [r] = completion({"prompt": "hi", "echo": True, "logprobs": 4})
    assert r.params.prompt_logprobs == 4 and r.prompt_logprobs == -1


def test_prompt_logprobs_alone_may_score_without_generating():
    [r] = completion({"prompt": "hi", "max_tokens": 0, "prompt_logprobs": 1})
    assert r.params.max_tokens == 0 and r.params.prompt_logprobs == 1


# ---- chat template inputs --------------------------------------------------------------------------
def _template(messages, **kw) -> list[int]:
    return TOK(TOK.apply_chat_template(messages, tokenize=False, **kw), add_special_tokens=False).input_ids


def test_add_generation_prompt_false_leaves_the_assistant_turn_out():
    turns = [{"role": "user", "content": "hi"}]
    assert chat({"messages": HI}).prompt == _template(turns, add_generation_prompt=True)
    off = chat({"messages": HI, "add_generation_prompt": False}).prompt
    assert off == _template(turns, add_generation_prompt=False) and len(off) < len(chat({"messages": HI}).prompt)


def test_continue_final_message_leaves_the_last_message_open():
    body = {"messages": HI + msgs("The answer is", role="assistant"), "add_generation_prompt": False}
    r = chat({**body, "continue_final_message": True})
    assert r.prompt == TOK("<user>hi.<assistant>The answer is", add_special_tokens=False).input_ids
    assert chat(body).prompt == r.prompt + TOK(".", add_special_tokens=False).input_ids


def test_chat_template_kwargs_are_template_variables():
    plain = chat({"messages": HI}).prompt
    thinking = chat({"messages": HI, "chat_template_kwargs": {"think": True}}).prompt
    assert thinking == _template([{"role": "user", "content": "hi"}], add_generation_prompt=True, think=True)
    assert thinking != plain and chat({"messages": HI, "chat_template_kwargs": {}}).prompt == plain


BAD_TEMPLATE_INPUTS = [
    ({"messages": HI + msgs("so", role="assistant"), "continue_final_message": True}, "continue_final_message"),
    ({"messages": HI, "continue_final_message": True, "add_generation_prompt": False}, "messages"),
    ({"messages": HI, "chat_template_kwargs": {"tokenize": True}}, "chat_template_kwargs"),
    ({"messages": HI, "chat_template_kwargs": {"add_generation_prompt": False}}, "chat_template_kwargs"),
    ({"messages": HI, "chat_template_kwargs": ["think"]}, "chat_template_kwargs"),
    ({"messages": HI, "add_generation_prompt": "no"}, "add_generation_prompt"),
]


@pytest.mark.parametrize("body,param", BAD_TEMPLATE_INPUTS, ids=_ids(BAD_TEMPLATE_INPUTS))
def test_bad_template_inputs(body, param):
    assert_400(chat, body, param)


# ---- fields the API does not know -------------------------------------------------------------------
def test_unknown_field_is_ignored_and_logged_once_per_name(caplog):
    name = f"unknown_{uuid.uuid4().hex[:8]}"  # new to this process, whatever ran before
    with caplog.at_level(logging.WARNING, logger="toka.server"):
        [r] = completion({"prompt": "hi", name: {"any": [1]}, "temperature": 0.5})
        assert r.params.temperature == 0.5
        chat({"messages": HI, name: 1})
    warned = [rec for rec in caplog.records if name in rec.getMessage()]
    assert len(warned) == 1 and warned[0].levelno == logging.WARNING


def test_known_fields_are_still_checked_beside_unknown_ones():
    assert_400(completion, {"zz_unknown": 1, "prompt": "hi", "temperature": -1}, "temperature")
    assert_400(completion, {"zz_unknown": 1, "prompt": "hi", "temperature": "hot"}, "temperature")
    with pytest.raises(APIError) as e:
        completion(b'{"zz_unknown": 1, "prompt": "hi",}')
    assert e.value.status == 400 and "malformed" in e.value.message


def test_nested_unknown_fields_pass():
    r = chat({"messages": [{"role": "user", "content": "hi", "tool_call_id": "x"}]})
    assert r.prompt == chat({"messages": HI}).prompt


UNSERVED = [
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"function_call": "auto"}, "function_call"),
    ({"use_beam_search": True}, "use_beam_search"),
    ({"guided_json": {"type": "object"}}, "guided_json"),
    ({"guided_choice": ["a", "b"]}, "guided_choice"),
    ({"structured_outputs": {"regex": "a+"}}, "structured_outputs"),
    ({"tools": [{"type": "function"}]}, "tools"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"best_of": 2}, "best_of"),
]


@pytest.mark.parametrize("fields,param", UNSERVED, ids=_ids(UNSERVED))
def test_unserved_field_is_a_400_naming_it(fields, param):
    assert_400(chat, {"messages": HI, **fields}, param)


@pytest.mark.parametrize("fields", [{"tool_choice": "none"}, {"tool_choice": "auto"}, {"use_beam_search": False},
                                    {"functions": []}, {"guided_json": None}])
def test_unserved_field_with_its_harmless_value_passes(fields):
    assert chat({"messages": HI, **fields}).prompt == chat({"messages": HI}).prompt


def test_completion_suffix_is_still_refused():
    assert_400(completion, {"prompt": "hi", "suffix": "x"}, "suffix")


def test_body_with_unknown_fields_decodes_like_one_without():
    body = {"prompt": [5, 6], "max_tokens": 3, "stop": ["a"], "logprobs": 1}
    plain = api.decode_body(json.dumps(body).encode(), api.CompletionRequest)
    extra = api.decode_body(json.dumps({**body, "zz_unknown_too": [1, 2]}).encode(), api.CompletionRequest)
    assert extra == plain


@pytest.mark.parametrize("given,served", [(1e-300, 1 / api.MAX_REPETITION_PENALTY), (1e300, api.MAX_REPETITION_PENALTY),
                                          (1e-3, 1e-3), (50.0, 50.0)])
def test_repetition_penalty_is_served_within_float32s_reach(given, served):
    [r] = completion({"prompt": "hi", "repetition_penalty": given})
    assert r.params.repetition_penalty == pytest.approx(served)
