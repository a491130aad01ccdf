"""The OpenAI-compatible HTTP API (aiohttp): /v1/completions, /v1/chat/completions, /v1/models,
/health and /metrics. Routes validate and tokenize, submit one engine sequence per choice, and turn
token events into JSON or server-sent events; a client that goes away aborts its sequences."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
import uuid
from collections import Counter

from aiohttp import web

from toka.server import api
from toka.server.api import APIError, EngineRequest
from toka.server.detokenizer import Detokenizer, StopMatcher
from toka.server.engine_client import EngineClient, EngineDead, OutputStream

log = logging.getLogger("toka.server")


class Choice:
    """One output sequence as the client sees it: text so far and the finish reason."""

    def __init__(self, index: int, stream: OutputStream, req: EngineRequest, tokenizer):
        self.index, self.stream, self.req = index, stream, req
        self.detok = Detokenizer(tokenizer)
        self.stop = StopMatcher(req.stop)
        self.text = ""
        self.sent_tokens = 0
        self.finish: str | None = None

    async def deltas(self, engine: EngineClient):
        """Yields (text delta, first new token index, end token index) until the sequence ends."""
        s = self.stream
        while True:
            if not s.done:
                await s.wait()
            if s.error:
                raise EngineDead(s.error)
            start, end = self.sent_tokens, len(s.tokens)
            final = s.done
            text = self.stop.feed(self.detok.add(s.tokens[start:end], final=final), final=final)
            self.sent_tokens = end
            if self.stop.stopped and not s.done:
                engine.abort(s)
            if self.stop.stopped:
                self.finish = "stop"
            elif final:
                self.finish = s.finish
            self.text += text
            yield text, start, end
            if self.finish is not None:
                return


class Server:
    def __init__(self, cfg, tokenizer):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.limits = api.Limits(cfg.vocab_size, cfg.max_model_len, cfg.eos_token_ids, cfg.sampling_defaults)
        self.engine: EngineClient | None = None
        self.ready = False
        self.draining = False
        self.counters: Counter[int] = Counter()  # error responses by HTTP status
        self.finished: Counter[str] = Counter()  # choices by how they ended for the client
        self.active = 0  # generation requests in flight (being validated, generated or written)
        self.rng = random.Random(cfg.seed)

    # ---- app -----------------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.cfg.max_body_bytes, handler_args={})
        app.add_routes([
            web.post("/v1/completions", self.completions),
            web.post("/v1/chat/completions", self.chat),
            web.get("/v1/models", self.models),
            web.get("/health", self.health),
            web.get("/metrics", self.metrics),
        ])
        app.middlewares.append(self._errors)
        return app

    @web.middleware
    async def _errors(self, request, handler):
        try:
            return await handler(request)
        except APIError as e:
            error = e
        except web.HTTPRequestEntityTooLarge:  # aiohttp's own 413 has no OpenAI body
            error = APIError(f"the request body exceeds {self.cfg.max_body_bytes} bytes", None)
        except EngineDead as e:
            error = APIError(f"the engine failed: {e}", None, 503, "server_error")
        except web.HTTPException as e:  # aiohttp's own answers (404, 405): in the API's format
            if e.status < 400:
                raise
            error = APIError(e.reason, None, e.status)
        except ConnectionError:  # the client went away mid-stream: nobody to answer
            raise
        except Exception as e:  # a bug: answer in the API's format, keep serving
            log.exception("request failed")
            error = APIError(f"internal error: {type(e).__name__}: {e}", None, 500, "server_error")
        self.counters[error.status] += 1
        return _error_response(error)

    # ---- simple routes -------------------------------------------------------------------------
    async def health(self, request):
        ok = self.ready and not self.draining and not (self.engine and self.engine.dead)
        return web.json_response({"status": "ok" if ok else "unavailable"}, status=200 if ok else 503)

    async def models(self, request):
        return web.json_response({"object": "list", "data": [{
            "id": self.cfg.model_name, "object": "model", "created": 0, "owned_by": "toka",
            "max_model_len": self.cfg.max_model_len,
        }]})

    async def metrics(self, request):
        """Prometheus text. The scheduler's numbers come from its latest Stats message, sent every
        STATS_INTERVAL even while idle, so they settle once the engine does."""
        lines = []

        def metric(name, kind, help, values):
            lines.extend([f"# HELP toka_{name} {help}", f"# TYPE toka_{name} {kind}"])
            lines.extend(f"toka_{name}{labels} {value}" for labels, value in values)

        engine = self.engine
        metric("http_requests", "gauge", "generation requests in flight in the server", [("", self.active)])
        metric("http_streams", "gauge", "output sequences in flight in the server",
               [("", len(engine.streams) if engine else 0)])
        metric("http_errors", "counter", "error responses, by status",
               [(f'{{status="{k}"}}', v) for k, v in sorted(self.counters.items())])
        metric("requests_finished", "counter", "choices (one output sequence each) returned or given up, by "
               "finish reason: stop, length, abort (the client left) or error (the engine failed)",
               [(f'{{reason="{k}"}}', v) for k, v in sorted(self.finished.items())])
        s = engine.stats if engine else None
        if s is not None:
            metric("running", "gauge", "sequences on the ranks", [("", s.running)])
            metric("waiting", "gauge", "sequences waiting for a slot or pages", [("", s.waiting)])
            metric("free_pages", "gauge", "free KV-cache pages", [("", s.free_pages)])
            metric("total_pages", "gauge", "KV-cache pages", [("", s.total_pages)])
            metric("tokens_generated", "counter", "output tokens generated", [("", s.tokens_generated)])
            metric("preemptions", "counter", "sequences preempted for pages", [("", s.preemptions)])
            metric("steps", "counter", "steps completed", [("", s.steps)])
            metric("cached_pages", "gauge", "free pages kept for the prefix cache (counted in free_pages)",
                   [("", s.cached_pages)])
            metric("prefix_hit_tokens", "counter", "prompt tokens found in the prefix cache", [("", s.prefix_hit_tokens)])
            metric("grouped_rows", "counter", "decode rows that attended to a shared prefix once per group (Hydragen)",
                   [("", s.grouped_rows)])
            metric("finished", "counter", "sequences the scheduler finished, by reason (abort: a stop string, "
                   "a client gone, a drain timeout)",
                   [(f'{{reason="{k}"}}', v) for k, v in sorted(s.finished.items())])
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")

    # ---- generation routes ---------------------------------------------------------------------
    async def completions(self, request):
        return await self._serve(request, chat=False)

    async def chat(self, request):
        return await self._serve(request, chat=True)

    async def _serve(self, request, chat: bool):
        self.active += 1
        try:
            if chat:
                req = api.decode_body(await request.read(), api.ChatRequest)
                engine_reqs = [api.chat_request(req, self.tokenizer, self.limits, self._seed(req.seed))]
            else:
                req = api.decode_body(await request.read(), api.CompletionRequest)
                engine_reqs = api.completion_requests(req, self.tokenizer, self.limits, self._seed(req.seed))
            return await self._generate(request, req, engine_reqs, chat)
        finally:
            self.active -= 1

    def _seed(self, seed: int | None) -> int:
        """63 bits, so that choice i's seed + i still fits the 64-bit integers msgpack carries."""
        return seed & ((1 << 63) - 1) if seed is not None else self.rng.getrandbits(63)

    def _admit(self, engine_reqs: list[EngineRequest]) -> None:
        """The scheduler runs up to max_seqs sequences and queues the rest in arrival order, so the
        sequences in flight past max_seqs are the waiting ones (at least: a sequence may also wait for
        pages). The token bound counts the prompt of every request in flight, once for its n choices
        (they share it). A request that would push either past its bound gets a 429; one that does
        not wait is always taken."""
        if not self.ready or self.draining:
            raise APIError("the server is not accepting requests", None, 503, "server_error")
        if self.engine.dead:
            raise EngineDead(self.engine.dead)
        streams = self.engine.streams
        if not streams:
            return
        cfg = self.cfg
        new = sum(r.n for r in engine_reqs)
        waiting = max(0, len(streams) + new - cfg.max_seqs)  # O(1): this runs for every request
        if waiting > cfg.max_waiting_requests:
            raise APIError(f"{max(0, waiting - new)} sequences are waiting already; retry later", None, 429,
                           "rate_limit_error")
        tokens = self.engine.prompt_tokens + sum(len(r.prompt) for r in engine_reqs)  # once for its n choices
        if waiting and tokens > cfg.max_waiting_tokens:
            raise APIError("too many prompt tokens are queued; retry later", None, 429, "rate_limit_error")

    async def _generate(self, request, req, engine_reqs: list[EngineRequest], chat: bool):
        self._admit(engine_reqs)
        choices: list[Choice] = []
        try:
            for r in engine_reqs:
                for stream in self.engine.submit(r.prompt, r.params, r.n, each_token=req.stream or bool(r.stop)):
                    choices.append(Choice(len(choices), stream, r, self.tokenizer))
            if req.stream:
                return await self._stream(request, req, choices, chat)
            tasks = [asyncio.ensure_future(self._drain(c)) for c in choices]
            try:
                await asyncio.gather(*tasks)
            finally:  # one choice failing leaves no other waiting forever
                for t in tasks:
                    t.cancel()
            return web.json_response(self._full_response(req, choices, chat), dumps=_dumps)
        finally:  # finished, failed, or cancelled because the client went away
            for c in choices:
                if not c.stream.done:
                    self.engine.abort(c.stream)
                self.finished[c.finish or ("error" if c.stream.error else "abort")] += 1

    async def _drain(self, choice: Choice) -> None:
        async for _ in choice.deltas(self.engine):
            pass

    async def _stream(self, request, req, choices: list[Choice], chat: bool):
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        rid, created = _new_id(chat), int(time.time())
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(c: Choice):
            try:
                first = True
                async for text, start, end in c.deltas(self.engine):
                    await queue.put(self._chunk(req, c, text, start, end, chat, first, rid, created))
                    first = False
            except EngineDead as e:
                await queue.put(APIError(f"the engine failed: {e}", None, 503, "server_error"))
            except Exception as e:  # a bug: tell the client rather than end its stream silently
                log.exception("stream failed")
                await queue.put(APIError(f"internal error: {type(e).__name__}: {e}", None, 500, "server_error"))
            finally:
                await queue.put(None)

        tasks = [asyncio.create_task(pump(c)) for c in choices]
        try:
            remaining, failed = len(tasks), False
            while remaining:
                item = await queue.get()
                if item is None:
                    remaining -= 1
                    continue
                if isinstance(item, APIError):  # an error event, then the stream ends as usual
                    failed, item = True, item.body()
                await resp.write(b"data: " + _dumps(item).encode() + b"\n\n")
            if req.stream_options and req.stream_options.include_usage and not failed:
                usage = {"id": rid, "object": _object(chat, True), "created": created, "model": self.cfg.model_name,
                         "choices": [], "usage": _usage(choices)}
                await resp.write(b"data: " + _dumps(usage).encode() + b"\n\n")
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        except ConnectionResetError:
            pass  # the client went away; _generate aborts what is still running
        finally:
            for t in tasks:
                t.cancel()
        return resp

    # ---- response bodies -----------------------------------------------------------------------
    def _chunk(self, req, c: Choice, text, start, end, chat, first, rid, created) -> dict:
        choice = {"index": c.index, "finish_reason": c.finish, "logprobs": self._logprobs(req, c, start, end, chat, first)}
        if chat:
            choice["delta"] = {"role": "assistant", "content": text} if first else {"content": text}
        else:
            choice["text"] = (self._prompt_text(c) if req.echo and first else "") + text
        return {"id": rid, "object": _object(chat, True), "created": created, "model": self.cfg.model_name, "choices": [choice]}

    def _full_response(self, req, choices: list[Choice], chat: bool) -> dict:
        out = []
        for c in choices:
            choice = {"index": c.index, "finish_reason": c.finish,
                      "logprobs": self._logprobs(req, c, 0, len(c.stream.tokens), chat, True)}
            if chat:
                choice["message"] = {"role": "assistant", "content": c.text}
            else:
                choice["text"] = (self._prompt_text(c) if req.echo else "") + c.text
            out.append(choice)
        return {"id": _new_id(chat), "object": _object(chat, False), "created": int(time.time()),
                "model": self.cfg.model_name, "choices": out, "usage": _usage(choices)}

    def _prompt_text(self, c: Choice) -> str:
        return self.tokenizer.decode(c.req.prompt, skip_special_tokens=False)

    def _logprobs(self, req, c: Choice, start: int, end: int, chat: bool, first: bool):
        s = c.stream
        if s.params.logprobs < 0:
            return None
        ids = s.tokens[start:end]
        lps, tops = s.logprobs[start:end], s.top[start:end]
        if chat:
            return {"content": [self._chat_entry(req, t, lp, top) for t, lp, top in zip(ids, lps, tops)]}
        if req.echo and first:
            ids = c.req.prompt + ids
            lps = s.prompt_logprobs + lps
            tops = s.prompt_top + tops
        toks = self._names(req, ids)
        offsets, pos = [], 0
        for t in ids:
            offsets.append(pos)
            pos += len(self.tokenizer.decode([t]))
        return {
            "tokens": toks,
            "token_logprobs": lps,
            "top_logprobs": [self._top_dict(req, top) if top is not None else ({} if lp is not None else None)
                             for top, lp in zip(tops, lps)],
            "text_offset": offsets,
        }

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
        return {"token": self._names(req, [token])[0], "logprob": lp,
                "bytes": list(self.tokenizer.decode([token]).encode())}


def _usage(choices: list[Choice]) -> dict:
    prompts: dict[int, tuple[int, int]] = {}  # once per prompt, not per choice: (tokens, cached tokens)
    for c in choices:
        tokens, cached = prompts.get(id(c.req), (len(c.req.prompt), c.stream.cached))
        prompts[id(c.req)] = (tokens, min(cached, c.stream.cached))  # cached for every choice of it
    prompt = sum(t for t, _ in prompts.values())
    completion = sum(c.stream.sampled for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(c for _, c in prompts.values())}}


def _object(chat: bool, chunk: bool) -> str:
    if chat:
        return "chat.completion.chunk" if chunk else "chat.completion"
    return "text_completion"


def _new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex


def _dumps(obj) -> str:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False)


def _error_response(e: APIError) -> web.Response:
    headers = {"Retry-After": "1"} if e.status == 429 else None
    return web.json_response(e.body(), status=e.status, headers=headers)
