"""The server's side of the fabric: submits requests, follows rank 0's token events, keeps the
latest scheduler stats. Each output sequence is an `OutputStream` the route awaits."""

from __future__ import annotations

import asyncio
import logging
import time

import zmq
import zmq.asyncio

from toka import protocol
from toka.fabric import secure
from toka.protocol import SamplingParams, StepResult, TopLogprobs

log = logging.getLogger("toka.server")


class EngineDead(Exception):
    pass


class OutputStream:
    """One sequence's output as rank 0 reports it; `accept` (shared with the scheduler) decides which
    tokens belong to it and when it ends."""

    def __init__(self, rid: int, prompt_len: int, prompt_share: int, params: SamplingParams, each_token: bool,
                 prompt: list[int] | None = None):
        self.rid = rid  # within its replica's engine; a new one if another replica takes it over
        self.replica = 0
        self.prompt = prompt  # the request's list (shared by its n choices), for a takeover
        self.params = params
        self.prompt_share = prompt_share  # its part of the prompt tokens in flight: n choices split the length
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.top: list[TopLogprobs | None] = []
        scored = prompt_len if params.prompt_logprobs >= 0 else 0  # kept only when asked for
        self.prompt_logprobs: list[float | None] = [None] * scored
        self.prompt_top: list[TopLogprobs | None] = [None] * scored
        self.prompt_ranks: list[int | None] = [None] * scored  # None where the ranks sent none
        self.sampled = 0  # tokens counted as completion tokens: kept ones and a final stop token
        self.cached = 0  # prompt tokens whose KV the prefix cache held when it was first scheduled
        self.finish: str | None = None
        self.stop_token: int | None = None  # the stop token that ended it (finish "stop"); not in `tokens`
        self.error: str | None = None
        # time.monotonic() of the first token sampled and of the engine ending it, for the latency
        # metrics: read once a sequence, so the tokens in between cost no clock reads
        self.first_at: float | None = None
        self.end_at: float | None = None
        # a reader that only needs the final result (no streaming, no stop strings) is woken once at
        # the end instead of once per token: the per-token path is the server's hot loop
        self.each_token = each_token
        self._changed = asyncio.Event()

    def _add(self, token: int, logprob: float, top: TopLogprobs | None) -> bool:
        keep, reason = self.params.accept(token, len(self.tokens))
        if keep:
            self.tokens.append(token)
            self.logprobs.append(logprob)
            self.top.append(top)
        if self.first_at is None:
            self.first_at = time.monotonic()
        self.sampled += keep or reason == "stop"
        if reason == "stop":
            self.stop_token = token
        self.finish = reason
        if reason is not None:
            self.end_at = time.monotonic()
            self._changed.set()
        elif self.each_token:
            self._changed.set()
        return reason is not None

    def _fail(self, message: str) -> None:
        self.error = message
        self._changed.set()

    async def wait(self) -> None:
        await self._changed.wait()
        self._changed.clear()

    @property
    def done(self) -> bool:
        return self.finish is not None or self.error is not None


class EngineClient:
    def __init__(self, cfg):
        self.cfg = cfg
        self.ctx = zmq.asyncio.Context()
        self.requests = self.ctx.socket(zmq.PUSH)
        self.requests.connect(cfg.endpoint("requests"))
        self.events = self.ctx.socket(zmq.SUB)
        self.events.setsockopt(zmq.SUBSCRIBE, b"")
        self.events.setsockopt(zmq.RCVHWM, 1 << 14)
        if events := cfg.endpoint("events"):  # else follow_events(), once a rank on another node is READY
            self.events.connect(events)
        self.status = self.ctx.socket(zmq.PULL)
        self.status.bind(cfg.endpoint("status"))
        self.event_decoder = protocol.decoder(protocol.EventMsg)
        self.status_decoder = protocol.decoder(protocol.StatusMsg)
        self.streams: dict[int, OutputStream] = {}
        self.prompt_tokens = 0  # prompt tokens in flight: the streams' prompt shares
        self.output_budget = 0  # the open streams' max_tokens
        self.replica = cfg.replica
        self.stats: protocol.Stats | None = None
        self.dead: str | None = None
        self.failed = asyncio.Event()  # set with `dead`: the launcher treats it like a dead process
        self._next_rid = 0
        self._next_step = 0
        self._tasks: list[asyncio.Task] = []

    def follow_events(self, endpoint: str) -> None:
        """The replica's token events come from a rank on another node, which bound them there."""
        secure(self.events, self.cfg.cluster_key, server=False)
        self.events.connect(endpoint)

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._follow_events()), asyncio.create_task(self._follow_status())]

    def submit(self, prompt: list[int], params: SamplingParams, n: int = 1,
               each_token: bool = True) -> list[OutputStream]:
        """The n choices of `prompt`, one stream each (choice i sampled with params.for_choice(i))."""
        if self.dead:
            raise EngineDead(self.dead)
        rid = self._next_rid
        self._next_rid += n
        share, extra = divmod(len(prompt), n)
        streams = [OutputStream(rid + i, len(prompt), share + (i < extra), params.for_choice(i), each_token, prompt)
                   for i in range(n)]
        for stream in streams:
            self._register(stream)
        self.requests.send(protocol.encode(protocol.Submit(rid, prompt, params, n)))
        return streams

    def adopt(self, stream: OutputStream) -> None:
        """Takes over a stream whose replica died before it returned a token: a new rid here, the same
        object for the route reading it."""
        stream.rid = self._next_rid
        self._next_rid += 1
        self._register(stream)
        self.requests.send(protocol.encode(protocol.Submit(stream.rid, stream.prompt, stream.params, 1)))

    @property
    def load(self) -> int:
        """Tokens this engine has yet to serve, at most: the open streams' prompts and output budgets."""
        return self.prompt_tokens + self.output_budget

    def _register(self, stream: OutputStream) -> None:
        stream.replica = self.replica
        self.streams[stream.rid] = stream
        self.prompt_tokens += stream.prompt_share
        self.output_budget += stream.params.max_tokens

    def _forget(self, stream: OutputStream) -> None:
        if self.streams.pop(stream.rid, None) is not None:
            self.prompt_tokens -= stream.prompt_share
            self.output_budget -= stream.params.max_tokens

    def abort(self, stream: OutputStream) -> None:
        """Stops generation for a stream that is not done (stop string hit, client gone)."""
        self._forget(stream)
        if not self.dead and not stream.done:
            self.requests.send(protocol.encode(protocol.Abort(stream.rid)))

    def drain(self) -> None:
        self.requests.send(protocol.encode(protocol.Drain()))

    def abort_all(self, message: str) -> None:
        """Ends every open stream with an error (the drain timed out); the engine stays usable."""
        for stream in list(self.streams.values()):
            self.abort(stream)
            stream._fail(message)

    def fail_all(self, message: str) -> None:
        """The engine died: every waiting route gets an error now."""
        self.dead = self.dead or message
        self.failed.set()
        for stream in self.streams.values():
            stream._fail(message)
        self.streams.clear()
        self.prompt_tokens = self.output_budget = 0

    async def _follow_events(self) -> None:
        try:
            while True:
                frame = await self.events.recv(copy=False)
                result: StepResult = self.event_decoder.decode(frame.buffer)
                if result.step_id != self._next_step:
                    self.fail_all(f"token events lost: expected step {self._next_step}, got {result.step_id}")
                    return
                self._next_step += 1
                self._apply(result)
        except Exception as e:  # without this task no request would ever finish: the engine is dead
            log.exception("reading token events failed")
            self.fail_all(f"reading token events failed: {type(e).__name__}: {e}")

    def _apply(self, result: StepResult) -> None:
        streams = self.streams
        for p in result.prompt:
            stream = streams.get(p.rid)
            if stream is None:
                continue
            for j, lp in enumerate(p.logprobs):
                pos = p.start + j
                if pos < len(stream.prompt_logprobs):  # a recomputed sequence also scores its own output
                    stream.prompt_logprobs[pos] = lp
                    stream.prompt_top[pos] = p.top[j] if p.top else None
                    stream.prompt_ranks[pos] = p.ranks[j] if p.ranks else None
        for rid, cached in zip(result.cached_rids, result.cached_tokens):
            if rid in streams:
                streams[rid].cached = cached
        tops = dict(zip(result.top_rows, result.top))
        for i, (rid, token, lp) in enumerate(zip(result.rids, result.tokens, result.logprobs)):
            stream = streams.get(rid)
            if stream is not None and stream._add(token, lp, tops.get(i)):
                self._forget(stream)

    async def _follow_status(self) -> None:
        while True:
            self.stats = self.status_decoder.decode(await self.status.recv())

    def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        self.ctx.destroy(linger=0)
