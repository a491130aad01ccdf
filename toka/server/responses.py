"""Every body the API answers with: completions and chat completions, whole or as stream chunks,
their logprobs and usage, and errors. One builder per body kind, so a new response field goes in
one place; the routes (app.py) only choose which body to build."""

from __future__ import annotations

import json
import time
import uuid
from typing import TYPE_CHECKING

from aiohttp import web

from toka.protocol import TopLogprobs
from toka.server.api import APIError
from toka.server.token_bytes import TokenBytes

if TYPE_CHECKING:
    from toka.server.app import Choice


class Responses:
    """Builds the bodies of one server: `tokenizer` names tokens, `model_name` is what they report."""

    def __init__(self, tokenizer, model_name: str):
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.token_bytes = TokenBytes(tokenizer)

    # ---- whole responses -----------------------------------------------------------------------
    def full(self, req, choices: list[Choice], chat: bool) -> dict:
        choice = self._chat_choice if chat else self._completion_choice
        body = {"id": new_id(chat), "object": object_name(chat, False), "created": int(time.time()),
                "model": self.model_name, "choices": [choice(req, c) for c in choices], "usage": usage(choices)}
        if chat:  # vLLM's place for them in a chat response: its one prompt's, beside the choices
            body["prompt_logprobs"] = self._prompt_logprobs(req, choices[0])
        return body

    def _completion_choice(self, req, c: Choice) -> dict:
        return {"index": c.index, "text": (self._prompt_text(c) if req.echo else "") + c.text,
                "finish_reason": c.finish, "stop_reason": c.stop_reason,
                "logprobs": self._completion_logprobs(req, c, 0, len(c.stream.tokens), True),
                "prompt_logprobs": self._prompt_logprobs(req, c)}

    def _chat_choice(self, req, c: Choice) -> dict:
        return {"index": c.index, "message": {"role": "assistant", "content": c.text}, "finish_reason": c.finish,
                "stop_reason": c.stop_reason, "logprobs": self._chat_logprobs(req, c, 0, len(c.stream.tokens))}

    # ---- stream chunks -------------------------------------------------------------------------
    def chunk(self, req, c: Choice, text: str, start: int, end: int, chat: bool, first: bool, rid: str,
              created: int) -> dict:
        """The chunk of choice `c`'s tokens [start, end), whose text is `text`."""
        if chat:
            choice = self._chat_delta(req, c, text, start, end, first)
        else:
            choice = self._completion_delta(req, c, text, start, end, first)
        return {"id": rid, "object": object_name(chat, True), "created": created, "model": self.model_name,
                "choices": [choice]}

    def _completion_delta(self, req, c: Choice, text: str, start: int, end: int, first: bool) -> dict:
        return {"index": c.index, "text": (self._prompt_text(c) if req.echo and first else "") + text,
                "finish_reason": c.finish, "stop_reason": c.stop_reason,
                "logprobs": self._completion_logprobs(req, c, start, end, first)}

    def _chat_delta(self, req, c: Choice, text: str, start: int, end: int, first: bool) -> dict:
        delta = {"role": "assistant", "content": text} if first else {"content": text}
        return {"index": c.index, "delta": delta, "finish_reason": c.finish, "stop_reason": c.stop_reason,
                "logprobs": self._chat_logprobs(req, c, start, end)}

    def usage_chunk(self, rid: str, created: int, chat: bool, choices: list[Choice]) -> dict:
        """The last chunk of a stream that asked for stream_options.include_usage."""
        return {"id": rid, "object": object_name(chat, True), "created": created, "model": self.model_name,
                "choices": [], "usage": usage(choices)}

    # ---- logprobs ------------------------------------------------------------------------------
    def _completion_logprobs(self, req, c: Choice, start: int, end: int, first: bool) -> dict | None:
        s = c.stream
        if s.params.logprobs < 0:
            return None
        ids, lps, tops = s.tokens[start:end], s.logprobs[start:end], s.top[start:end]
        if req.echo and first:
            ids = c.req.prompt + ids
            lps = s.prompt_logprobs + lps
            k = s.params.logprobs  # prompt_logprobs may have had the prompt scored with more alternatives
            tops = [t if t is None or len(t.ids) <= k else TopLogprobs(t.ids[:k], t.logprobs[:k])
                    for t in s.prompt_top] + tops
        offsets, pos = [], c.text_offset  # 0 for a whole response; a stream's chunks run on
        for t in ids:
            offsets.append(pos)
            pos += len(self.tokenizer.decode([t]))
        c.text_offset = pos
        return {
            "tokens": self._names(req, ids),
            "token_logprobs": lps,
            "top_logprobs": [self._top_dict(req, top) if top is not None else ({} if lp is not None else None)
                             for top, lp in zip(tops, lps)],
            "text_offset": offsets,
        }

    def _chat_logprobs(self, req, c: Choice, start: int, end: int) -> dict | None:
        s = c.stream
        if s.params.logprobs < 0:
            return None
        return {"content": [self._chat_entry(req, t, lp, top)
                            for t, lp, top in zip(s.tokens[start:end], s.logprobs[start:end], s.top[start:end])]}

    def _prompt_logprobs(self, req, c: Choice) -> list[dict | None] | None:
        """vLLM's prompt_logprobs: per prompt token after the first, token id (a string) -> logprob,
        rank (1: the most likely) and text, for the prompt token and the k most likely ones."""
        k = c.req.prompt_logprobs
        if k < 0:
            return None
        s, prompt = c.stream, c.req.prompt
        ids = list(set(prompt[1:]).union(*(t.ids[:k] for t in s.prompt_top[1:] if t is not None)))
        if req.return_tokens_as_token_ids:
            text = {t: f"token_id:{t}" for t in ids}
        else:
            text = dict(zip(ids, self.tokenizer.batch_decode([[t] for t in ids], skip_special_tokens=False)))
        out: list[dict | None] = [None]
        for token, lp, top, rank in zip(prompt[1:], s.prompt_logprobs[1:], s.prompt_top[1:], s.prompt_ranks[1:]):
            alternatives = list(zip(top.ids[:k], top.logprobs[:k])) if top is not None else []
            if rank is None and top is not None and token in top.ids:  # no ranks came: known among the top
                rank = top.ids.index(token) + 1
            entry = {str(token): {"logprob": lp, "rank": rank, "decoded_token": text[token]}}
            for r, (t, p) in enumerate(alternatives, 1):
                entry[str(t)] = {"logprob": p, "rank": r, "decoded_token": text[t]}
            out.append(entry)
        return out

    def _names(self, req, ids: list[int]) -> list[str]:
        if req.return_tokens_as_token_ids:
            return [f"token_id:{t}" for t in ids]
        return self.tokenizer.convert_ids_to_tokens(ids)

    def _top_dict(self, req, top) -> dict:
        return dict(zip(self._names(req, top.ids), top.logprobs))

    def _chat_entry(self, req, token: int, lp: float, top) -> dict:
        entry = self._token_entry(req, token, lp)
        entry["top_logprobs"] = [self._token_entry(req, t, p) for t, p in zip(top.ids, top.logprobs)] if top else []
        return entry

    def _token_entry(self, req, token: int, lp: float) -> dict:
        return {"token": self._names(req, [token])[0], "logprob": lp, "bytes": self.token_bytes(token)}

    def _prompt_text(self, c: Choice) -> str:
        return self.tokenizer.decode(c.req.prompt, skip_special_tokens=False)


def usage(choices: list[Choice]) -> dict:
    prompts: dict[int, tuple[int, int]] = {}  # once per prompt, not per choice: (tokens, cached tokens)
    for c in choices:
        tokens, cached = prompts.get(id(c.req), (len(c.req.prompt), c.stream.cached))
        prompts[id(c.req)] = (tokens, min(cached, c.stream.cached))  # cached for every choice of it
    prompt = sum(t for t, _ in prompts.values())
    completion = sum(c.stream.sampled for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(c for _, c in prompts.values())}}


def object_name(chat: bool, chunk: bool) -> str:
    if chat:
        return "chat.completion.chunk" if chunk else "chat.completion"
    return "text_completion"


def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex


def dumps(obj) -> str:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False)


def sse(obj) -> bytes:
    """One server-sent event carrying `obj` as JSON."""
    return b"data: " + dumps(obj).encode() + b"\n\n"


def error_response(e: APIError) -> web.Response:
    headers = {"Retry-After": "1"} if e.status == 429 else None
    return web.json_response(e.body(), status=e.status, headers=headers)
