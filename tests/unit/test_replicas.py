"""The server's replica set without processes: requests stay on one replica with their n choices, a
dead replica's unstarted streams move to a live one as the same objects, started ones fail naming
it, and the engine is dead only when no replica lives (or at once with fail-fast)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from toka.protocol import SamplingParams
from toka.server.engine_client import EngineClient
from toka.server.replicas import Replicas

PARAMS = SamplingParams(max_tokens=8)


def replicas(tmp_path, n: int, fail_fast: bool = False) -> Replicas:
    clients = [EngineClient(SimpleNamespace(endpoint=lambda name, k=k: f"ipc://{tmp_path}/{name}.{k}", replica=k))
               for k in range(n)]
    return Replicas(clients, page_size=4, fail_fast=fail_fast)


def run(coro):
    return asyncio.run(coro)


def test_choices_stay_together_and_load_spreads(tmp_path):
    async def main():
        r = replicas(tmp_path, 2)
        try:
            a = r.submit(list(range(100, 140)), PARAMS, n=3)
            b = r.submit(list(range(500, 540)), PARAMS, n=2)
            assert {s.replica for s in a} == {0} and {s.replica for s in b} == {1}  # b: the least loaded
            assert len(r.streams) == 5 and r.prompt_tokens == 80
            r.abort(b[0])
            assert len(r.clients[1].streams) == 1
        finally:
            r.close()

    run(main())


def test_a_dead_replica_hands_over_what_it_never_started(tmp_path):
    async def main():
        r = replicas(tmp_path, 3)
        try:
            streams = [s for p in range(3) for s in r.submit([p * 1000 + i for i in range(40)], PARAMS)]
            victim = streams[1]
            assert victim.replica == 1
            started = r.submit([7000 + i for i in range(40)], PARAMS)[0]  # the least loaded again: 0
            r.clients[started.replica]._apply(SimpleNamespace(
                prompt=[], cached_rids=[], cached_tokens=[], top_rows=[], top=[],
                rids=[started.rid], tokens=[5], logprobs=[-0.1]))
            assert started.tokens == [5]
            r.fail_replica(started.replica, "rank0 exited with code -9")
            assert not r.live[started.replica] and r.live_count == 2 and r.dead is None
            assert started.error and "replica 0" in started.error
            moved = streams[0]
            assert moved.error is None and moved.replica in (1, 2) and moved.rid in r.clients[moved.replica].streams
            assert victim.error is None  # replica 1 lives
            r.fail_replica(1, "gone")
            r.fail_replica(2, "gone")
            assert r.dead and r.live_count == 0 and moved.error
        finally:
            r.close()

    run(main())


@pytest.mark.parametrize("fail_fast", [True, False])
def test_fail_fast_ends_the_engine_at_the_first_death(tmp_path, fail_fast):
    async def main():
        r = replicas(tmp_path, 2, fail_fast=fail_fast)
        try:
            s = r.submit([1, 2, 3, 4, 5], PARAMS)[0]
            r.fail_replica(1 - s.replica, "gone")
            assert bool(r.dead) == fail_fast and bool(s.error) == fail_fast
        finally:
            r.close()

    run(main())
