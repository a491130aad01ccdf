"""The server's engine: one EngineClient per data-parallel replica behind the interface the routes
use (submit, abort, streams, drain...), with the Router choosing a replica for each request.

A replica that dies leaves the others serving: its streams that have not returned a token move to
a live replica (their readers see nothing), the others fail naming it. The engine as a whole is
dead when no replica lives, or at the first death with --dp-fail-fast (`dead` is then set).
"""

from __future__ import annotations

import asyncio
import logging

from toka.protocol import SamplingParams, Stats
from toka.server.engine_client import EngineClient, EngineDead, OutputStream
from toka.server.router import Router

log = logging.getLogger("toka.server")


class _AllStreams:
    """The open streams of every replica, as far as the routes and the launcher need them: how many."""

    def __init__(self, clients: list[EngineClient]):
        self.clients = clients

    def __len__(self) -> int:
        return sum(len(c.streams) for c in self.clients)


class Replicas:
    def __init__(self, clients: list[EngineClient], page_size: int, fail_fast: bool = False):
        self.clients = clients
        self.live = [True] * len(clients)
        self.router = Router(len(clients), page_size)
        self.fail_fast = fail_fast
        self.streams = _AllStreams(clients)
        self.dead: str | None = None
        self.failed = asyncio.Event()  # set with `dead`: the launcher treats it like a dead process
        self.changed = asyncio.Event()  # a replica left service: the launcher stops its processes
        self._watch: list[asyncio.Task] = []

    # ---- what the routes and the launcher call ------------------------------------------------
    def start(self) -> None:
        for c in self.clients:
            c.start()
        self._watch = [asyncio.ensure_future(self._follow(k)) for k in range(len(self.clients))]

    @property
    def live_count(self) -> int:
        return sum(self.live)

    @property
    def prompt_tokens(self) -> int:
        return sum(c.prompt_tokens for c, up in zip(self.clients, self.live) if up)

    def replica_stats(self) -> list[tuple[int, Stats]]:
        return [(k, c.stats) for k, c in enumerate(self.clients) if self.live[k] and c.stats is not None]

    def submit(self, prompt: list[int], params: SamplingParams, n: int = 1,
               each_token: bool = True) -> list[OutputStream]:
        """The n choices of `prompt` on one replica (they share the prompt's cache)."""
        if self.dead:
            raise EngineDead(self.dead)
        k = 0
        if len(self.clients) > 1:
            k = self.router.choose(prompt, [c.load for c in self.clients], self.live)
        return self.clients[k].submit(prompt, params, n, each_token)

    def abort(self, stream: OutputStream) -> None:
        self.clients[stream.replica].abort(stream)

    def drain(self) -> None:
        for c, up in zip(self.clients, self.live):
            if up:
                c.drain()

    def abort_all(self, message: str) -> None:
        for c, up in zip(self.clients, self.live):
            if up:
                c.abort_all(message)

    def fail_all(self, message: str) -> None:
        """The engine died: every waiting route gets an error now."""
        self.dead = self.dead or message
        self.failed.set()
        self.changed.set()
        for c in self.clients:
            c.fail_all(message)

    def close(self) -> None:
        for t in self._watch:
            t.cancel()
        for c in self.clients:
            c.close()

    # ---- a replica dying ---------------------------------------------------------------------------
    def fail_replica(self, k: int, reason: str) -> None:
        """Replica k is gone (a process died or its token events broke): the others take over what it
        never started; the rest of its streams fail naming it."""
        if not self.live[k] or self.dead:
            return
        self.live[k] = False
        self.changed.set()
        self.router.forget(k)
        if self.fail_fast or not any(self.live):
            self.fail_all(f"replica {k} failed: {reason}" if len(self.clients) > 1 else reason)
            return
        client = self.clients[k]
        moved = [s for s in client.streams.values() if not s.tokens and not s.done]
        for s in moved:
            client._forget(s)
        client.fail_all(f"replica {k} failed: {reason}")
        for s in moved:
            target = self.router.choose(s.prompt, [c.load for c in self.clients], self.live)
            self.clients[target].adopt(s)
        log.error("replica %d failed (%s): %d sequences moved to other replicas, %d replicas serve",
                  k, reason, len(moved), self.live_count)

    async def _follow(self, k: int) -> None:
        """A replica whose token events broke (its client failed itself) is a dead replica."""
        await self.clients[k].failed.wait()
        if self.live[k]:
            self.fail_replica(k, self.clients[k].dead or "token events lost")
