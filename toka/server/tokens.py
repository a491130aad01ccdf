"""/tokenize and /detokenize: their bodies, checked like every other request (a bad field is an
APIError naming it), and their answers."""

from __future__ import annotations

import msgspec

from toka.server import api
from toka.server.api import APIError


class TokenizeRequest(msgspec.Struct, kw_only=True):
    model: str | None = None
    prompt: str | None = None
    messages: list[api.Message] | None = None
    # unset: true for a prompt; false for messages, whose chat template writes the special tokens
    # (the chat route's prompt, as vLLM does)
    add_special_tokens: bool | None = None


class DetokenizeRequest(msgspec.Struct, kw_only=True):
    model: str | None = None
    tokens: list[int]


def tokenize(req: TokenizeRequest, tokenizer, max_model_len: int) -> dict:
    if (req.prompt is None) == (req.messages is None):
        raise APIError("give either prompt or messages", "prompt")
    if req.prompt is not None:
        ids = tokenizer(req.prompt, add_special_tokens=req.add_special_tokens is not False).input_ids
    else:
        ids = api.chat_prompt(req.messages, tokenizer)
        if req.add_special_tokens:
            ids = tokenizer.build_inputs_with_special_tokens(ids)
    return {"tokens": ids, "count": len(ids), "max_model_len": max_model_len}


def detokenize(req: DetokenizeRequest, tokenizer, vocab_size: int) -> dict:
    if any(not 0 <= t < vocab_size for t in req.tokens):
        raise APIError(f"tokens must be in [0, {vocab_size})", "tokens")
    return {"prompt": tokenizer.decode(req.tokens)}
