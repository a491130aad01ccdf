"""OpenAI request bodies: decoding, validation and translation into engine requests.

Everything is checked here, before anything reaches the scheduler; a problem raises `APIError`
naming the field, which the routes turn into a 400 with an OpenAI-style body.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import msgspec

from toka.protocol import SamplingParams

MAX_N = 2048
MAX_LOGPROBS = 20
MAX_STOP = 16
# Below this temperature, logits / temperature overflows float32 on the rank (NaN logprobs); the
# distribution is the argmax anyway, so it is served as greedy.
MIN_TEMPERATURE = 1e-5
# Ranks keep top_p in float32, where a tiny top_p rounds to 0 and filters out every token. Any
# top_p below 1 / vocab keeps just the most likely token, and so does this floor.
MIN_TOP_P = 1e-8


class APIError(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400, kind: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.kind, self.code = message, param, status, kind, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class StreamOptions(msgspec.Struct):
    include_usage: bool = False


class _Common(msgspec.Struct, kw_only=True):
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
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
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


def decode_body(body: bytes, kind):
    if not body:
        raise APIError("the request body is empty", None)
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as e:
        text = str(e)
        param = text.rsplit("`$.", 1)[-1].rstrip("`") if "`$." in text else None
        missing = re.search(r"missing required field `(\w+)`", text)
        if missing:  # name the missing field itself, not the object around it
            param = f"{param}.{missing[1]}" if param else missing[1]
        raise APIError(f"invalid request: {text}", param) from None
    except msgspec.DecodeError as e:
        raise APIError(f"malformed JSON: {e}", None) from None


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


ROLES = ("system", "user", "assistant", "developer", "tool")


def _check_common(req: _Common, limits: Limits) -> None:
    """Checks the fields every generation request has; fills unset sampling fields with defaults."""
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
    if req.presence_penalty or req.frequency_penalty:
        raise APIError("presence_penalty and frequency_penalty are not supported", "presence_penalty")
    if req.logit_bias:
        raise APIError("logit_bias is not supported", "logit_bias")
    for t in req.stop_token_ids or []:
        if not 0 <= t < vocab_size:
            raise APIError(f"stop_token_ids must be in [0, {vocab_size})", "stop_token_ids")


def _stop_strings(stop) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP:
        raise APIError(f"at most {MAX_STOP} stop strings", "stop")
    if any(not s for s in stops):
        raise APIError("stop strings must not be empty", "stop")
    return stops


def _params(req: _Common, limits: Limits, prompt_len: int, max_tokens: int | None, logprobs: int,
            prompt_logprobs: int, seed: int, prompt_field: str) -> SamplingParams:
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
    stop_ids = [] if req.ignore_eos else list(limits.eos_token_ids)
    stop_ids += [t for t in req.stop_token_ids or [] if t not in stop_ids]
    return SamplingParams(
        max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=max(req.top_k, 0),
        seed=seed, logprobs=logprobs, prompt_logprobs=prompt_logprobs, stop_token_ids=stop_ids,
    )


def completion_requests(req: CompletionRequest, tokenizer, limits: Limits, seed: int) -> list[EngineRequest]:
    _check_common(req, limits)
    if req.suffix:
        raise APIError("suffix is not supported", "suffix")
    if req.logprobs is not None and not 0 <= req.logprobs <= MAX_LOGPROBS:
        raise APIError(f"logprobs must be in [0, {MAX_LOGPROBS}]", "logprobs")
    if req.max_tokens == 0 and not req.echo:
        raise APIError("max_tokens must be >= 1 unless echo is true", "max_tokens")
    prompts = req.prompt
    if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
        prompts = [prompts]
    if not prompts:
        raise APIError("prompt must not be empty", "prompt")
    for p in prompts:
        if not isinstance(p, (str, list)) or (isinstance(p, list) and not all(isinstance(t, int) for t in p)):
            raise APIError("prompt must be a string, a list of strings, a list of token ids or a list of those", "prompt")
    stop = _stop_strings(req.stop)
    logprobs = -1 if req.logprobs is None else req.logprobs
    out = []
    for p in prompts:
        if isinstance(p, str):
            ids = tokenizer(p).input_ids
        else:
            ids = list(p)
            if any(not 0 <= t < limits.vocab_size for t in ids):
                raise APIError(f"prompt token ids must be in [0, {limits.vocab_size})", "prompt")
        if not ids:
            raise APIError("prompt must contain at least one token", "prompt")
        prompt_lp = logprobs if req.echo else -1
        params = _params(req, limits, len(ids), req.max_tokens, logprobs, prompt_lp, seed, "prompt")
        out.append(EngineRequest(ids, params, req.n, stop, echo=req.echo))
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


def chat_prompt(messages: list[Message], tokenizer) -> list[int]:
    """The prompt token ids of `messages` through the model's chat template, ready for the reply:
    what the chat route generates from and what /tokenize reports for them."""
    if not messages:
        raise APIError("messages must not be empty", "messages")
    for m in messages:
        if m.role not in ROLES:
            raise APIError(f"unknown role {m.role!r}; expected one of {', '.join(ROLES)}", "messages")
    turns = [{"role": m.role, "content": _text(m.content)} for m in messages]
    try:
        text = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
    except Exception as e:  # jinja errors from the model's own template
        raise APIError(f"the chat template rejected these messages: {e}", "messages") from None
    return tokenizer(text, add_special_tokens=False).input_ids  # the template wrote the special tokens


def chat_request(req: ChatRequest, tokenizer, limits: Limits, seed: int) -> EngineRequest:
    _check_common(req, limits)
    if req.tools:
        raise APIError("tools are not supported", "tools")
    if req.response_format and req.response_format.get("type", "text") != "text":
        raise APIError("response_format other than text is not supported", "response_format")
    if req.top_logprobs is not None:
        if not req.logprobs:
            raise APIError("top_logprobs needs logprobs=true", "top_logprobs")
        if not 0 <= req.top_logprobs <= MAX_LOGPROBS:
            raise APIError(f"top_logprobs must be in [0, {MAX_LOGPROBS}]", "top_logprobs")
    ids = chat_prompt(req.messages, tokenizer)
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    if max_tokens == 0:
        raise APIError("max_tokens must be >= 1", "max_tokens")
    logprobs = (req.top_logprobs or 0) if req.logprobs else -1
    params = _params(req, limits, len(ids), max_tokens, logprobs, -1, seed, "messages")
    return EngineRequest(ids, params, req.n, _stop_strings(req.stop))
