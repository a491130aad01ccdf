"""OpenAI request bodies: decoding, validation and translation into engine requests.

Everything is checked here, before anything reaches the scheduler; a problem raises `APIError`
naming the field, which the routes turn into a 400 with an OpenAI-style body.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass

import msgspec

from toka.protocol import SamplingParams

log = logging.getLogger("toka.server")

MAX_N = 2048
MAX_LOGPROBS = 20
MAX_STOP = 16
# Below this temperature, logits / temperature overflows float32 on the rank (NaN logprobs); the
# distribution is the argmax anyway, so it is served as greedy.
MIN_TEMPERATURE = 1e-5
# Ranks keep top_p in float32, where a tiny top_p rounds to 0 and filters out every token. Any
# top_p below 1 / vocab keeps just the most likely token, and so does this floor.
MIN_TOP_P = 1e-8
MAX_LOGIT_BIAS = 100.0
MAX_PENALTY = 2.0  # presence_penalty and frequency_penalty lie in [-MAX_PENALTY, MAX_PENALTY] (OpenAI's range)
# Ranks keep repetition_penalty in float32, where a huge one is inf (and 0 * inf, for a logit of 0, NaN)
# and a tiny one 0 (a division by zero). Past this factor either way the sampled distribution is the
# same, so a repetition_penalty outside [1 / MAX, MAX] is served as the bound.
MAX_REPETITION_PENALTY = 1e6


class APIError(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400, kind: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.kind, self.code = message, param, status, kind, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class StreamOptions(msgspec.Struct):
    include_usage: bool = False


# The request structs forbid unknown fields, so that a body without any decodes once; `decode_body`
# handles the rare other one.
class _Common(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    model: str | None = None
    temperature: float | None = None  # unset: the model's generation_config, else 1.0
    top_p: float | None = None
    top_k: int | None = None
    n: int = 1
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    # logprobs name tokens "token_id:<id>" instead of their text (as vLLM does): exact ids for RL
    # and for scoring an output under another configuration
    return_tokens_as_token_ids: bool = False
    # vLLM's sampling options, with its meanings (see SamplingParams); null is the default, which
    # changes nothing
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    min_p: float | None = None
    min_tokens: int = 0
    logit_bias: dict[str, float] | None = None  # token id (a JSON key) -> added to its logit
    # vLLM's output options
    include_stop_str_in_output: bool = False  # the text ends with the stop string that ended it
    skip_special_tokens: bool = True
    prompt_logprobs: int | None = None  # k: every prompt token's logprob and rank, with k alternatives
    best_of: int | None = None
    user: str | None = None


class CompletionRequest(_Common, kw_only=True):
    # str, list[str], list[int] or list[list[int]] (msgspec allows one list type per union)
    prompt: str | list[str | int | list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None


class ContentPart(msgspec.Struct):
    type: str
    text: str | None = None


class Message(msgspec.Struct):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatRequest(_Common, kw_only=True):
    messages: list[Message]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list | None = None
    response_format: dict | None = None
    # the chat template's inputs besides the messages (vLLM's)
    add_generation_prompt: bool = True  # end the prompt with the start of the assistant's turn
    continue_final_message: bool = False  # the last (assistant) message is continued, left open
    chat_template_kwargs: dict | None = None  # more template variables, e.g. Qwen3's enable_thinking


# Fields of other servers (OpenAI's older API, vLLM) that no request struct here has, whose every value
# but the listed harmless ones asks for something the engine does not do: a 400 naming them, not silence.
UNSERVED = {
    "functions": (None, []), "function_call": (None, "none"), "tool_choice": (None, "none", "auto"),
    "use_beam_search": (None, False), "structured_outputs": (None,), "guided_json": (None,),
    "guided_regex": (None,), "guided_choice": (None,), "guided_grammar": (None,),
}
MAX_WARNED = 1024  # unknown field names remembered (and logged once each); a bound on a client's doing
_warned: set[str] = set()


def decode_body(body: bytes, kind):
    if not body:
        raise APIError("the request body is empty", None)
    try:
        try:
            return msgspec.json.decode(body, type=kind)
        except msgspec.ValidationError as e:
            if not str(e).startswith("Object contains unknown field"):  # at the top: nested structs allow them
                raise
        return _decode_known(body, kind)
    except msgspec.ValidationError as e:
        raise _invalid(e) from None
    except msgspec.DecodeError as e:
        raise APIError(f"malformed JSON: {e}", None) from None


def _decode_known(body: bytes, kind):
    """A body with fields `kind` does not know: each one is ignored (and logged once per process),
    except one in UNSERVED that asks for what the engine does not do."""
    fields = msgspec.json.decode(body, type=dict[str, msgspec.Raw])
    for name in fields.keys() - set(kind.__struct_encode_fields__):
        if name in UNSERVED and msgspec.json.decode(fields[name]) not in UNSERVED[name]:
            raise APIError(f"{name} is not supported", name)
        del fields[name]
        if name not in _warned and len(_warned) < MAX_WARNED:
            _warned.add(name)
            log.warning("requests name a field %r that the API does not know; it is ignored", name)
    return msgspec.json.decode(msgspec.json.encode(fields), type=kind)


def _invalid(e: msgspec.ValidationError) -> APIError:
    text = str(e)
    # msgspec writes a value in a dict as `[...]`, which names no key: the dict's field it is
    param = text.rsplit("`$.", 1)[-1].rstrip("`").replace("[...]", "") if "`$." in text else None
    missing = re.search(r"missing required field `(\w+)`", text)
    if missing:  # name the missing field itself, not the object around it
        param = f"{param}.{missing[1]}" if param else missing[1]
    return APIError(f"invalid request: {text}", param)


@dataclass
class Limits:
    vocab_size: int
    max_model_len: int
    eos_token_ids: list[int]
    sampling_defaults: dict  # temperature / top_p / top_k from the model's generation_config.json


@dataclass
class EngineRequest:
    """One prompt of an API request, with everything the engine and the response need."""

    prompt: list[int]
    params: SamplingParams
    n: int
    stop: list[str]
    echo: bool = False
    include_stop: bool = False  # the text ends with what ended it: the stop string, or the stop token's text
    skip_special: bool = True  # special tokens are left out of the text
    prompt_logprobs: int = -1  # alternatives per prompt token in the response's prompt_logprobs; -1: none


ROLES = ("system", "user", "assistant", "developer", "tool")


def _check_common(req: _Common, limits: Limits) -> dict:
    """Checks the fields every generation request has; returns the SamplingParams keywords they give
    each of its prompts. Unset temperature, top_p and top_k come from the model's generation_config."""
    vocab_size = limits.vocab_size
    for name, fallback in (("temperature", 1.0), ("top_p", 1.0), ("top_k", -1)):
        if getattr(req, name) is None:
            setattr(req, name, limits.sampling_defaults.get(name, fallback))
    if req.temperature < 0:
        raise APIError("temperature must be >= 0", "temperature")
    if req.temperature < MIN_TEMPERATURE:
        req.temperature = 0.0
    if not 0 < req.top_p <= 1:
        raise APIError("top_p must be in (0, 1]", "top_p")
    req.top_p = max(req.top_p, MIN_TOP_P)
    if req.seed is not None and not -(1 << 63) <= req.seed < 1 << 64:
        raise APIError("seed must fit in 64 bits", "seed")
    if req.top_k < -1 or req.top_k > vocab_size:
        raise APIError(f"top_k must be -1 or 0 (off) or in [1, {vocab_size}]", "top_k")
    if not 1 <= req.n <= MAX_N:
        raise APIError(f"n must be in [1, {MAX_N}]", "n")
    if req.best_of is not None and req.best_of != req.n:
        raise APIError("best_of other than n is not supported", "best_of")
    for name in ("presence_penalty", "frequency_penalty"):
        if not -MAX_PENALTY <= (getattr(req, name) or 0.0) <= MAX_PENALTY:
            raise APIError(f"{name} must be in [{-MAX_PENALTY}, {MAX_PENALTY}]", name)
    repetition_penalty = 1.0 if req.repetition_penalty is None else req.repetition_penalty
    if not 0 < repetition_penalty < math.inf:
        raise APIError("repetition_penalty must be > 0 (1: none)", "repetition_penalty")
    repetition_penalty = min(max(repetition_penalty, 1 / MAX_REPETITION_PENALTY), MAX_REPETITION_PENALTY)
    if not 0 <= (req.min_p or 0.0) <= 1:
        raise APIError("min_p must be in [0, 1]", "min_p")
    if req.min_tokens < 0:
        raise APIError("min_tokens must be >= 0", "min_tokens")
    for t in req.stop_token_ids or []:
        if not 0 <= t < vocab_size:
            raise APIError(f"stop_token_ids must be in [0, {vocab_size})", "stop_token_ids")
    stop_ids = [] if req.ignore_eos else list(limits.eos_token_ids)
    stop_ids += [t for t in req.stop_token_ids or [] if t not in stop_ids]
    return {
        "temperature": req.temperature, "top_p": req.top_p, "top_k": max(req.top_k, 0), "stop_token_ids": stop_ids,
        "min_p": req.min_p or 0.0, "repetition_penalty": repetition_penalty,
        "frequency_penalty": req.frequency_penalty or 0.0, "presence_penalty": req.presence_penalty or 0.0,
        "min_tokens": req.min_tokens, "logit_bias": _logit_bias(req.logit_bias or {}, vocab_size),
    }


def _logit_bias(bias: dict[str, float], vocab_size: int) -> dict[int, float]:
    out = {}
    for key, value in bias.items():
        if not (key.isascii() and key.isdigit()) or int(key) >= vocab_size:
            raise APIError(f"logit_bias keys must be token ids in [0, {vocab_size}), not {key!r}", "logit_bias")
        if not -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS:
            raise APIError(f"logit_bias values must be in [{-MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], not {value} "
                           f"(token {key})", "logit_bias")
        out[int(key)] = value
    return out


def _outputs(req: _Common) -> dict:
    """The EngineRequest keywords of the output options every generation request has."""
    k = req.prompt_logprobs
    if k is not None:
        if not 0 <= k <= MAX_LOGPROBS:
            raise APIError(f"prompt_logprobs must be in [0, {MAX_LOGPROBS}]", "prompt_logprobs")
        if req.stream:  # as vLLM: they would all come before the first token anyway
            raise APIError("prompt_logprobs are not available with stream=true", "prompt_logprobs")
    return {"include_stop": req.include_stop_str_in_output, "skip_special": req.skip_special_tokens,
            "prompt_logprobs": -1 if k is None else k}


def _stop_strings(stop) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP:
        raise APIError(f"at most {MAX_STOP} stop strings", "stop")
    if any(not s for s in stops):
        raise APIError("stop strings must not be empty", "stop")
    return stops


def _params(sampling: dict, limits: Limits, prompt_len: int, max_tokens: int | None, prompt_field: str,
            **fields) -> SamplingParams:
    """One prompt's SamplingParams: the request's `sampling` keywords, the prompt's own `fields`."""
    if prompt_len > limits.max_model_len:
        raise APIError(f"the prompt has {prompt_len} tokens; the context window is {limits.max_model_len}", prompt_field)
    if max_tokens is None:  # chat default: whatever room the context window leaves
        max_tokens = limits.max_model_len - prompt_len
        if max_tokens == 0:
            raise APIError(f"the prompt fills the whole context window of {limits.max_model_len} tokens", prompt_field)
    if max_tokens < 0:
        raise APIError("max_tokens must be >= 0", "max_tokens")
    if prompt_len + max_tokens > limits.max_model_len:
        raise APIError(
            f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) exceeds the context window "
            f"of {limits.max_model_len} tokens", "max_tokens")
    if sampling["min_tokens"] > max_tokens:
        raise APIError(f"min_tokens ({sampling['min_tokens']}) must not exceed max_tokens ({max_tokens})", "min_tokens")
    return SamplingParams(max_tokens=max_tokens, **sampling, **fields)


def completion_requests(req: CompletionRequest, tokenizer, limits: Limits, seed: int) -> list[EngineRequest]:
    sampling, outputs = _check_common(req, limits), _outputs(req)
    if req.suffix:
        raise APIError("suffix is not supported", "suffix")
    if req.logprobs is not None and not 0 <= req.logprobs <= MAX_LOGPROBS:
        raise APIError(f"logprobs must be in [0, {MAX_LOGPROBS}]", "logprobs")
    if req.max_tokens == 0 and not req.echo and req.prompt_logprobs is None:
        raise APIError("max_tokens must be >= 1 unless echo is true or prompt_logprobs is set", "max_tokens")
    prompts = req.prompt
    if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
        prompts = [prompts]
    if not prompts:
        raise APIError("prompt must not be empty", "prompt")
    for p in prompts:
        # the decoder has checked each item's type (str, int or a list of ints): a list must not mix
        # them; one C-level pass over its types, where a generator would run Python code per token
        if not isinstance(p, (str, list)) or (isinstance(p, list) and not set(map(type, p)) <= {int}):
            raise APIError("prompt must be a string, a list of strings, a list of token ids or a list of those", "prompt")
    stop = _stop_strings(req.stop)
    logprobs = -1 if req.logprobs is None else req.logprobs
    # the engine scores the prompt once, with as many alternatives as echo and prompt_logprobs need
    scored = max(logprobs if req.echo else -1, outputs["prompt_logprobs"])
    out = []
    for p in prompts:
        if isinstance(p, str):
            ids = tokenizer(p).input_ids
        else:
            ids = list(p)
            if min(ids, default=0) < 0 or max(ids, default=0) >= limits.vocab_size:  # builtins: fast on long prompts
                raise APIError(f"prompt token ids must be in [0, {limits.vocab_size})", "prompt")
        if not ids:
            raise APIError("prompt must contain at least one token", "prompt")
        params = _params(sampling, limits, len(ids), req.max_tokens, "prompt", seed=seed, logprobs=logprobs,
                         prompt_logprobs=scored)
        out.append(EngineRequest(ids, params, req.n, stop, echo=req.echo, **outputs))
    return out


def _text(content) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for part in content:
        if part.type != "text":
            raise APIError(f"content part type {part.type!r} is not supported (text only)", "messages")
        parts.append(part.text or "")
    return "".join(parts)


# apply_chat_template's own parameters: template variables must not change what it returns, nor
# stand in for the request's fields
TEMPLATE_PARAMETERS = frozenset((
    "conversation", "tools", "documents", "chat_template", "add_generation_prompt", "continue_final_message",
    "tokenize", "sanitize_control_tokens", "padding", "truncation", "max_length", "return_tensors", "return_dict",
    "return_assistant_tokens_mask", "tokenizer_kwargs",
))


def chat_prompt(messages: list[Message], tokenizer, add_generation_prompt: bool = True,
                continue_final_message: bool = False, template_kwargs: dict | None = None) -> list[int]:
    """The prompt token ids of `messages` through the model's chat template: ready for the reply
    (add_generation_prompt), or open at the end of the last, assistant message to continue it
    (continue_final_message). What the chat route generates from and what /tokenize reports."""
    if not messages:
        raise APIError("messages must not be empty", "messages")
    for m in messages:
        if m.role not in ROLES:
            raise APIError(f"unknown role {m.role!r}; expected one of {', '.join(ROLES)}", "messages")
    if continue_final_message:
        if add_generation_prompt:  # a new turn after the one to continue: vLLM refuses it too
            raise APIError("continue_final_message needs add_generation_prompt=false", "continue_final_message")
        if messages[-1].role != "assistant":
            raise APIError("continue_final_message needs the last message to be the assistant's", "messages")
    kwargs = template_kwargs or {}
    if clash := sorted(TEMPLATE_PARAMETERS.intersection(kwargs)):
        raise APIError(f"chat_template_kwargs must not set {', '.join(clash)}", "chat_template_kwargs")
    turns = [{"role": m.role, "content": _text(m.content)} for m in messages]
    try:
        text = tokenizer.apply_chat_template(turns, add_generation_prompt=add_generation_prompt,
                                             continue_final_message=continue_final_message, tokenize=False, **kwargs)
    except Exception as e:  # jinja errors from the model's own template
        raise APIError(f"the chat template rejected these messages: {e}", "messages") from None
    return tokenizer(text, add_special_tokens=False).input_ids  # the template wrote the special tokens


def chat_request(req: ChatRequest, tokenizer, limits: Limits, seed: int) -> EngineRequest:
    sampling, outputs = _check_common(req, limits), _outputs(req)
    if req.tools:
        raise APIError("tools are not supported", "tools")
    if req.response_format and req.response_format.get("type", "text") != "text":
        raise APIError("response_format other than text is not supported", "response_format")
    if req.top_logprobs is not None:
        if not req.logprobs:
            raise APIError("top_logprobs needs logprobs=true", "top_logprobs")
        if not 0 <= req.top_logprobs <= MAX_LOGPROBS:
            raise APIError(f"top_logprobs must be in [0, {MAX_LOGPROBS}]", "top_logprobs")
    ids = chat_prompt(req.messages, tokenizer, req.add_generation_prompt, req.continue_final_message,
                      req.chat_template_kwargs)
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    if max_tokens == 0:
        raise APIError("max_tokens must be >= 1", "max_tokens")
    logprobs = (req.top_logprobs or 0) if req.logprobs else -1
    params = _params(sampling, limits, len(ids), max_tokens, "messages", seed=seed, logprobs=logprobs,
                     prompt_logprobs=outputs["prompt_logprobs"])
    return EngineRequest(ids, params, req.n, _stop_strings(req.stop), **outputs)
