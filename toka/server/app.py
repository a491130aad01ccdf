"""The OpenAI-compatible HTTP API (aiohttp): /v1/completions, /v1/chat/completions, /v1/models,
/tokenize, /detokenize, /version, /health and /metrics, and the Files and Batches routes of
toka/batches. Routes validate and tokenize, submit one engine sequence per choice, and turn token
events into JSON or server-sent events; a client that goes away aborts its sequences. The bodies
themselves are built in responses.py. Batch lines take the same path through `respond`."""

from __future__ import annotations

import asyncio
import hmac
import logging
import random
import time
from importlib.metadata import version

from aiohttp import web

from toka.batches.routes import Batches
from toka.server import api, metrics, tokens
from toka.server.api import APIError, EngineRequest
from toka.server.detokenizer import Detokenizer, StopMatcher
from toka.server.engine_client import EngineClient, EngineDead, OutputStream
from toka.server.responses import Responses, dumps, error_response, new_id, sse

log = logging.getLogger("toka.server")


class Choice:
    """One output sequence as the client sees it: text so far, the finish reason and what ended it."""

    def __init__(self, index: int, stream: OutputStream, req: EngineRequest, tokenizer):
        self.index, self.stream, self.req = index, stream, req
        self.detok = Detokenizer(tokenizer, req.skip_special)
        self.stop = StopMatcher(req.stop, req.include_stop)
        self.text = ""
        self.sent_tokens = 0
        self.finish: str | None = None
        self.stop_reason: str | int | None = None  # vLLM's: the stop string or stop token id that ended it
        # text_offset of the next token a stream chunk reports: responses.py adds each reported
        # token's length, so that the offsets run on across chunks as in the whole response
        self.text_offset = 0

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
            ids, text = s.tokens[start:end], ""
            if start < s.params.min_tokens:  # as vLLM: a stop string counts from the token after min_tokens
                early = min(s.params.min_tokens, end) - start
                text = self.stop.feed(self.detok.add(ids[:early]), search=False)
                ids = ids[early:]
            stop_text = final and self.req.include_stop and s.stop_token is not None
            text += self.stop.feed(self.detok.add(ids, final=final and not stop_text), final=final and not stop_text)
            if stop_text:  # as vLLM: the stop token's text too, where no stop string is looked for
                text += self.stop.feed(self.detok.add([s.stop_token], final=True), final=True, search=False)
            self.sent_tokens = end
            if self.stop.stopped and not s.done:
                engine.abort(s)
            if self.stop.stopped:
                self.finish, self.stop_reason = "stop", self.stop.matched
            elif final:
                self.finish, self.stop_reason = s.finish, s.stop_token
            self.text += text
            yield text, start, end
            if self.finish is not None:
                return


class Server:
    def __init__(self, cfg, tokenizer, engine: EngineClient):
        """`engine` exists before the ranks start (its sockets must be subscribed before their first
        step): /health and /metrics read it from the first request, generation routes only after
        `start()`."""
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.limits = self._limits()
        self.engine = engine
        self.responses = Responses(tokenizer, cfg.model_name)
        self.metrics = metrics.ServerMetrics()
        # compared in constant time, as bytes (compare_digest takes str only when ASCII)
        self._auth_header = f"Bearer {cfg.api_key}".encode() if cfg.api_key else None
        self.ready = False
        self.draining = False
        self.active = 0  # generation requests in flight (being validated, generated or written)
        self.rng = random.Random(cfg.seed)
        self.batches = Batches(self)

    def _limits(self) -> api.Limits:
        cfg = self.cfg
        return api.Limits(cfg.vocab_size, cfg.max_model_len, cfg.eos_token_ids, cfg.sampling_defaults)

    def start(self) -> None:
        """Called once every process is READY: the KV cache is sized, so cfg.max_model_len is final.
        Starts following the engine and admitting requests."""
        self.limits = self._limits()
        self.engine.start()
        self.ready = True
        self.batches.start()

    # ---- app -----------------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.cfg.max_body_bytes, handler_args={})
        app.add_routes([
            web.post("/v1/completions", self.completions),
            web.post("/v1/chat/completions", self.chat),
            web.get("/v1/models", self.models),
            web.get("/v1/models/{name:.+}", self.model),  # hub names have a slash
            web.post("/tokenize", self.tokenize),
            web.post("/detokenize", self.detokenize),
            web.get("/version", self.version),
            web.get("/health", self.health),
            web.get("/metrics", self.prometheus),
            *self.batches.routes(),
        ])
        app.on_cleanup.append(self.batches.close)  # after the listener closed: commits what the batches hold
        app.middlewares.extend([self._errors, self._auth])  # _errors outermost: it formats _auth's 401
        return app

    @web.middleware
    async def _auth(self, request, handler):
        """With --api-key, every /v1 route and /tokenize, /detokenize need it; health checks and
        scrapers (/health, /metrics, /version) stay open."""
        path = request.path
        if self._auth_header is not None and (path.startswith("/v1/") or path in ("/tokenize", "/detokenize")):
            given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
            if not hmac.compare_digest(given, self._auth_header):
                raise APIError("a valid API key is needed: send the header 'Authorization: Bearer <key>'", None,
                               401, "invalid_request_error", "invalid_api_key")
        return await handler(request)

    @web.middleware
    async def _errors(self, request, handler):
        try:
            return await handler(request)
        except APIError as e:
            error = e
        except web.HTTPRequestEntityTooLarge:  # aiohttp's own 413 has no OpenAI body
            error = self._too_large()
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
            error = internal_error(e)
        self.metrics.errors[error.status] += 1
        return error_response(error)

    def _too_large(self) -> APIError:
        return APIError(f"the request body exceeds {self.cfg.max_body_bytes} bytes", None, 413)

    # ---- simple routes -------------------------------------------------------------------------
    async def health(self, request):
        ok = self.ready and not self.draining and not self.engine.dead  # dead: no replica lives
        body = {"status": "ok" if ok else "unavailable", "replicas": self.engine.live_count}
        return web.json_response(body, status=200 if ok else 503)

    async def models(self, request):
        return web.json_response({"object": "list", "data": [self._model_card(n) for n in self.cfg.served_names]})

    async def model(self, request):
        return web.json_response(self._model_card(self._served(request.match_info["name"])))

    def _model_card(self, name: str) -> dict:
        return {"id": name, "object": "model", "created": 0, "owned_by": "toka", "root": self.cfg.model,
                "max_model_len": self.cfg.max_model_len}

    def _served(self, name: str | None) -> str:
        """The model a request names, which must be one this server serves; unnamed is the first."""
        if name is None:
            return self.cfg.model_name
        if name not in self.cfg.served_names:
            served = ", ".join(repr(n) for n in self.cfg.served_names)
            raise APIError(f"the model {name!r} does not exist; this server serves {served}", "model", 404,
                           "model_not_found", "model_not_found")
        return name

    async def tokenize(self, request):
        req = api.decode_body(await request.read(), tokens.TokenizeRequest)
        self._served(req.model)
        return web.json_response(tokens.tokenize(req, self.tokenizer, self.limits.max_model_len))

    async def detokenize(self, request):
        req = api.decode_body(await request.read(), tokens.DetokenizeRequest)
        self._served(req.model)
        return web.json_response(tokens.detokenize(req, self.tokenizer, self.limits.vocab_size))

    async def version(self, request):
        return web.json_response({"version": version("toka")})

    async def prometheus(self, request):
        return web.Response(text=metrics.render(self), content_type="text/plain")

    # ---- generation routes ---------------------------------------------------------------------
    async def completions(self, request):
        return await self._serve(request, chat=False)

    async def chat(self, request):
        return await self._serve(request, chat=True)

    async def _serve(self, request, chat: bool):
        arrival = time.monotonic()
        self.active += 1
        try:
            req, engine_reqs = self.parse(await request.read(), chat)
            self._admit(engine_reqs)
            body = await self._generate(req, engine_reqs, chat, arrival, request if req.stream else None)
            return body if req.stream else web.json_response(body, dumps=dumps)
        finally:
            self.active -= 1

    def parse(self, body: bytes, chat: bool) -> tuple[api.ChatRequest | api.CompletionRequest, list[EngineRequest]]:
        """A generation request's JSON body, validated and tokenized; raises APIError."""
        if chat:
            req = api.decode_body(body, api.ChatRequest)
            self._served(req.model)
            return req, [api.chat_request(req, self.tokenizer, self.limits, self._seed(req.seed))]
        req = api.decode_body(body, api.CompletionRequest)
        self._served(req.model)
        return req, api.completion_requests(req, self.tokenizer, self.limits, self._seed(req.seed))

    async def respond(self, body: bytes, chat: bool) -> tuple[int, dict]:
        """A generation request made without HTTP (a batch line): the status and the body the route
        answers the same body with. The admission bounds do not apply (the caller bounds what it has
        in flight). EngineDead propagates: the engine failed or shut down, the request did not run.
        May be called once `start()` ran."""
        arrival = time.monotonic()
        self.active += 1
        try:
            if len(body) > self.cfg.max_body_bytes:
                raise self._too_large()
            req, engine_reqs = self.parse(body, chat)
            if req.stream:
                raise APIError("stream is not available in a batch", "stream")
            return 200, await self._generate(req, engine_reqs, chat, arrival)
        except APIError as e:
            return e.status, e.body()
        except EngineDead:
            raise
        except Exception as e:  # a bug: the answer the route gives, and the batch goes on
            log.exception("request failed")
            error = internal_error(e)
            return error.status, error.body()
        finally:
            self.active -= 1

    def _seed(self, seed: int | None) -> int:
        """63 bits, so that choice i's seed + i still fits the 64-bit integers msgpack carries."""
        return seed & ((1 << 63) - 1) if seed is not None else self.rng.getrandbits(63)

    def _admit(self, engine_reqs: list[EngineRequest]) -> None:
        """Each replica's scheduler runs up to max_seqs sequences and queues the rest in arrival order,
        so the sequences in flight past dp * max_seqs are the waiting ones (at least: a sequence may also wait for
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
        waiting = max(0, len(streams) + new - cfg.max_seqs * cfg.dp)  # O(replicas): this runs for every request
        if waiting > cfg.max_waiting_requests:
            raise APIError(f"{max(0, waiting - new)} sequences are waiting already; retry later", None, 429,
                           "rate_limit_error")
        queued = self.engine.prompt_tokens + sum(len(r.prompt) for r in engine_reqs)  # once for its n choices
        if waiting and queued > cfg.max_waiting_tokens:
            raise APIError("too many prompt tokens are queued; retry later", None, 429, "rate_limit_error")

    async def _generate(self, req, engine_reqs: list[EngineRequest], chat: bool, arrival: float,
                        stream_to: web.Request | None = None):
        """The whole response body, or with `stream_to` the stream written to that request."""
        choices: list[Choice] = []
        try:
            for r in engine_reqs:
                for stream in self.engine.submit(r.prompt, r.params, r.n, each_token=req.stream or bool(r.stop)):
                    choices.append(Choice(len(choices), stream, r, self.tokenizer))
            if stream_to is not None:
                return await self._stream(stream_to, req, choices, chat)
            tasks = [asyncio.ensure_future(self._drain(c)) for c in choices]
            try:
                await asyncio.gather(*tasks)
            finally:  # one choice failing leaves no other waiting forever
                for t in tasks:
                    t.cancel()
            return self.responses.full(req, choices, chat)
        finally:  # finished, failed, or cancelled because the client went away
            for c in choices:
                if not c.stream.done:
                    self.engine.abort(c.stream)
            self.metrics.record(arrival, choices)

    async def _drain(self, choice: Choice) -> None:
        async for _ in choice.deltas(self.engine):
            pass

    async def _stream(self, request, req, choices: list[Choice], chat: bool):
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        rid, created = new_id(chat), int(time.time())
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(c: Choice):
            try:
                first = True
                async for text, start, end in c.deltas(self.engine):
                    await queue.put(self.responses.chunk(req, c, text, start, end, chat, first, rid, created))
                    first = False
            except EngineDead as e:
                await queue.put(APIError(f"the engine failed: {e}", None, 503, "server_error"))
            except Exception as e:  # a bug: tell the client rather than end its stream silently
                log.exception("stream failed")
                await queue.put(internal_error(e))
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
                await resp.write(sse(item))
            if req.stream_options and req.stream_options.include_usage and not failed:
                await resp.write(sse(self.responses.usage_chunk(rid, created, chat, choices)))
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        except ConnectionResetError:
            pass  # the client went away; _generate aborts what is still running
        finally:
            for t in tasks:
                t.cancel()
        return resp


def internal_error(e: Exception) -> APIError:
    """The answer to a request that failed on a bug: in the API's format, and the server keeps serving."""
    return APIError(f"internal error: {type(e).__name__}: {e}", None, 500, "server_error")
