"""vLLM's request options through the official `openai` client (extra_body) against one launched
server: stop_reason, include_stop_str_in_output, skip_special_tokens, prompt_logprobs, the chat
template's inputs (add_generation_prompt, continue_final_message, chat_template_kwargs) and
unknown fields. The server runs tiny-llama with a chat template that, like Qwen3's, reads
`enable_thinking`."""

from __future__ import annotations

import json

import openai
import pytest
import requests
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.helpers import Server
from tools.make_model import make_model

# tools/make_model.py's template, plus Qwen3's empty thinking block when enable_thinking is false
TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
USER = [{"role": "user", "content": "tell me a story"}]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    path = make_model("tiny-llama", tmp_path_factory.mktemp("options") / "tiny-llama")
    cfg_path = path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = TEMPLATE
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return str(path)


@pytest.fixture(scope="module")
def server(model_path):
    server = Server("--model", model_path, "--kv-cache-tokens", "16384", "--max-seqs", "64")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


@pytest.fixture(scope="module")
def model(client) -> str:
    return client.models.list().data[0].id


@pytest.fixture(scope="module")
def tokenizer(model_path):
    return AutoTokenizer.from_pretrained(model_path)


def greedy(client, model, prompt, max_tokens=24, **kw):
    return client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, **kw)


def greedy_chat(client, model, messages=USER, max_tokens=24, **kw):
    return client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0, **kw)


def streamed(resp) -> tuple[str, object]:
    """A completion stream's text and its last chunk's choice."""
    chunks = [c for c in resp if c.choices]
    return "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0]


def template_ids(tokenizer, messages, **kw) -> list[int]:
    return tokenizer(tokenizer.apply_chat_template(messages, tokenize=False, **kw), add_special_tokens=False).input_ids


# ---- stop_reason and the stop options ----------------------------------------------------------------
def test_stop_string_is_the_stop_reason(client, model):
    full = greedy(client, model, "a b c", extra_body={"ignore_eos": True}).choices[0].text
    assert len(full) > 8
    stop = full[5:8]
    cut = full[: full.index(stop)]
    for include in (False, True):
        extra = {"ignore_eos": True, "include_stop_str_in_output": include}
        want = cut + stop if include else cut
        c = greedy(client, model, "a b c", stop=[stop], extra_body=extra).choices[0]
        assert (c.text, c.finish_reason, c.stop_reason) == (want, "stop", stop)
        text, last = streamed(greedy(client, model, "a b c", stop=[stop], stream=True, extra_body=extra))
        assert (text, last.finish_reason, last.stop_reason) == (want, "stop", stop)
    reply = greedy_chat(client, model, extra_body={"ignore_eos": True}).choices[0].message.content
    stop = reply[5:8]
    chat = greedy_chat(client, model, stop=[stop], extra_body={"ignore_eos": True}).choices[0]
    assert (chat.message.content, chat.finish_reason, chat.stop_reason) == (reply[: reply.index(stop)], "stop", stop)


def test_stop_token_id_is_the_stop_reason(client, model):
    lp = greedy(client, model, "once upon", logprobs=0,
                extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True}).choices[0].logprobs
    ids = [int(t.removeprefix("token_id:")) for t in lp.tokens]
    first = next(i for i, t in enumerate(ids) if i >= 2 and ids.index(t) == i)  # where it occurs first
    stop = ids[first]
    for stream in (False, True):
        resp = greedy(client, model, "once upon", stream=stream, extra_body={"stop_token_ids": [stop]})
        c = streamed(resp)[1] if stream else resp.choices[0]
        assert (c.finish_reason, c.stop_reason) == ("stop", stop)
    resp = greedy(client, model, "once upon", extra_body={"stop_token_ids": [stop]})
    assert resp.usage.completion_tokens == first + 1  # the stop token counts, as before
    length = greedy(client, model, "once upon", max_tokens=first, extra_body={"stop_token_ids": [stop]})
    assert (length.choices[0].finish_reason, length.choices[0].stop_reason) == ("length", None)


def test_eos_is_the_stop_reason(client, model, tokenizer):
    """logit_bias makes the model's end of turn (an EOS of its generation_config) the first token."""
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for resp in (greedy(client, model, "hi", extra_body={"logit_bias": {str(eos): 100}}),
                 greedy_chat(client, model, logit_bias={str(eos): 100})):
        c = resp.choices[0]
        assert (c.finish_reason, c.stop_reason) == ("stop", eos)
        assert resp.usage.completion_tokens == 1


def test_skip_special_tokens(client, model, tokenizer):
    start = tokenizer.convert_tokens_to_ids("<|im_start|>")  # special, and no end of sequence
    extra = {"logit_bias": {str(start): 100}}
    assert greedy(client, model, "hi", max_tokens=3, extra_body=extra).choices[0].text == ""
    kept = greedy(client, model, "hi", max_tokens=3, extra_body={**extra, "skip_special_tokens": False})
    assert kept.choices[0].text == "<|im_start|>" * 3


# ---- prompt_logprobs ---------------------------------------------------------------------------------
def test_prompt_logprobs_match_transformers(client, model, model_path, tokenizer):
    ids = tokenizer("the meaning of life is forty two").input_ids
    resp = greedy(client, model, ids, max_tokens=2, extra_body={"prompt_logprobs": 2})
    out = resp.choices[0].prompt_logprobs
    assert len(out) == len(ids) and out[0] is None
    hf = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0], -1)[:-1]
    ranked = 0
    for pos, entry in enumerate(out[1:], 1):
        scores, token = ref[pos - 1], ids[pos]
        top = scores.topk(2).indices.tolist()
        assert list(entry) == list(dict.fromkeys([str(token)] + [str(t) for t in top]))  # itself, then the top 2
        for key, value in entry.items():
            t = int(key)
            assert value["logprob"] == pytest.approx(scores[t].item(), abs=1e-3)
            assert value["decoded_token"] == tokenizer.decode([t])
            if t in top:
                assert value["rank"] == top.index(t) + 1
        rank = entry[str(token)]["rank"]
        if rank is not None:  # from the ranks (or, without them, known only among the top)
            assert rank == int((scores > scores[token] + 1e-4).sum()) + 1
            ranked += 1
    assert ranked == len(ids) - 1, "the ranks sent no ranks"


def test_chat_prompt_logprobs_are_beside_the_choices(client, model):
    resp = greedy_chat(client, model, max_tokens=2, extra_body={"prompt_logprobs": 0})
    out = resp.prompt_logprobs
    assert len(out) == resp.usage.prompt_tokens and out[0] is None
    assert all(len(entry) == 1 and next(iter(entry.values()))["rank"] >= 1 for entry in out[1:])
    assert greedy_chat(client, model, max_tokens=2).model_extra.get("prompt_logprobs") is None


def test_prompt_logprobs_with_stream_is_a_400(server):
    resp = requests.post(server.url + "/v1/completions", timeout=30,
                         json={"prompt": "hi", "prompt_logprobs": 1, "stream": True})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "prompt_logprobs"


# ---- the chat template's inputs ----------------------------------------------------------------------
def test_chat_template_kwargs_reach_the_template(client, model, tokenizer):
    plain = greedy_chat(client, model, max_tokens=1).usage.prompt_tokens
    thinking_off = greedy_chat(client, model, max_tokens=1,
                               extra_body={"chat_template_kwargs": {"enable_thinking": False}}).usage.prompt_tokens
    assert plain == len(template_ids(tokenizer, USER, add_generation_prompt=True))
    assert thinking_off == len(template_ids(tokenizer, USER, add_generation_prompt=True, enable_thinking=False))
    assert thinking_off > plain


def test_add_generation_prompt_and_continue_final_message(client, model, tokenizer):
    messages = USER + [{"role": "assistant", "content": "Once upon a time"}]
    no_prompt = greedy_chat(client, model, messages, max_tokens=1, extra_body={"add_generation_prompt": False})
    assert no_prompt.usage.prompt_tokens == len(template_ids(tokenizer, messages))
    extra = {"add_generation_prompt": False, "continue_final_message": True}
    cont = greedy_chat(client, model, messages, max_tokens=12, extra_body={**extra, "ignore_eos": True})
    ids = template_ids(tokenizer, messages, continue_final_message=True)
    assert cont.usage.prompt_tokens == len(ids) < no_prompt.usage.prompt_tokens
    # the reply goes on from the open message: the same text as completing its prompt ids
    same = greedy(client, model, ids, max_tokens=12, extra_body={"ignore_eos": True}).choices[0].text
    assert cont.choices[0].message.content == same
    with pytest.raises(openai.BadRequestError) as e:  # with add_generation_prompt (true by default), as vLLM
        greedy_chat(client, model, messages, max_tokens=1, extra_body={"continue_final_message": True})
    assert e.value.body["param"] == "continue_final_message"


# ---- fields the API does not know or does not serve ---------------------------------------------------
def test_unknown_field_is_ignored_and_logged_once(client, model, server):
    name = "a_field_nobody_knows"
    plain = greedy(client, model, "unknown", max_tokens=4).choices[0].text
    for _ in range(2):
        assert greedy(client, model, "unknown", max_tokens=4, extra_body={name: [1, 2]}).choices[0].text == plain
    assert server.output().count(repr(name)) == 1


@pytest.mark.parametrize("field,value", [("tool_choice", "required"), ("logit_bias", {"512": 1}),
                                         ("logit_bias", {"x": 1}), ("repetition_penalty", 0), ("min_p", 2),
                                         ("best_of", 3), ("use_beam_search", True)])
def test_unserved_fields_are_400s_naming_them(client, model, field, value):
    with pytest.raises(openai.BadRequestError) as e:
        greedy_chat(client, model, max_tokens=1, extra_body={field: value})
    assert e.value.status_code == 400 and e.value.body["param"] == field
