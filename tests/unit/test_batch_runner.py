"""The batch runner (toka/batches/runner.py) against a server stand-in whose requests each hold one
engine sequence for a moment: the window it keeps (every slot and the headroom, none while the
schedulers report a full headroom waiting, none while draining), batches in arrival order, a resume
that runs only pending lines, a line that failed on a dying replica run again, cancel, a batch whose
input vanished."""

from __future__ import annotations

import asyncio
import io
import json
from types import SimpleNamespace

from toka.batches import flow, lines
from toka.batches.runner import BatchRunner
from toka.batches.store import Result, Store
from toka.protocol import Stats
from toka.server.engine_client import EngineDead

MAX_SEQS = 4


class Engine:
    def __init__(self):
        self.streams: dict[int, str] = {}
        self.dead = None
        self.live_count = 1
        self.waiting = 0  # what the scheduler's stats report
        self.peak = 0

    def replica_stats(self):
        return [(0, Stats(running=0, waiting=self.waiting, free_pages=0, total_pages=0, tokens_generated=0,
                          finished={}, preemptions=0, steps=0))]


class FakeServer:
    """What the runner uses of toka.server.app.Server. A request holds a sequence for `hold` seconds;
    a body with "fail" is refused as the API refuses one; `dead_once` names prompts whose first run
    fails as on a replica that died."""

    def __init__(self, hold: float = 0.01):
        self.cfg = SimpleNamespace(max_seqs=MAX_SEQS, dp=1)
        self.engine = Engine()
        self.draining = False
        self.ready = True
        self.hold = hold
        self.started: list[str] = []
        self.dead_once: set[str] = set()
        self._rid = 0

    async def respond(self, body: bytes, chat: bool):
        req = json.loads(body)
        self.started.append(req["prompt"])
        self._rid += 1
        rid = self._rid
        self.engine.streams[rid] = req["prompt"]
        self.engine.peak = max(self.engine.peak, len(self.engine.streams))
        try:
            await asyncio.sleep(self.hold)
            if req["prompt"] in self.dead_once:
                self.dead_once.discard(req["prompt"])
                raise EngineDead("replica 1 failed")
            if req.get("fail"):
                return 400, {"error": {"message": "refused", "type": "invalid_request_error", "param": "fail",
                                       "code": None}}
            return 200, {"id": f"cmpl-{rid}", "choices": [{"text": req["prompt"].upper()}],
                         "usage": {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}}
        finally:
            del self.engine.streams[rid]


def batch_file(prefix: str, n: int, **body) -> bytes:
    return b"".join(json.dumps({"custom_id": f"{prefix}{i}", "method": "POST", "url": "/v1/completions",
                                "body": {"prompt": f"{prefix}{i}", **body}}).encode() + b"\n" for i in range(n))


def create(store: Store, data: bytes) -> dict:
    path = store.upload_path()
    path.write_bytes(data)
    f = store.add_file(path, "batch", "in.jsonl")
    index = ((n, o, length) for n, o, length, _ in lines.scan(io.BytesIO(data), ("/v1/completions",)))
    return store.create_batch("/v1/completions", f["id"], "24h", None, index)


async def until(predicate, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.005)


def output(store: Store, batch_id: str, column: str = "output_file_id") -> list[dict]:
    row = store.batch(batch_id)
    if row[column] is None:
        return []
    data = store.path(row[column]).read_bytes()[: store.file(row[column])["bytes"]]
    return [json.loads(line) for line in data.splitlines()]


def run(check, tmp_path, server: FakeServer | None = None) -> None:
    async def main():
        store = Store(tmp_path)
        runner = BatchRunner(store, server or FakeServer())
        try:
            await check(store, runner, runner.server)
        finally:
            await runner.close()

    asyncio.run(main())


def finished(store: Store, batch_id: str) -> bool:
    return store.batch(batch_id)["status"] in ("completed", "failed", "cancelled")


def test_a_batch_fills_the_window_and_completes_with_each_line_once(tmp_path):
    async def check(store, runner, server):
        batch = create(store, batch_file("a", 60) + batch_file("bad", 1, fail=True))
        runner.start()
        runner.add(batch)
        await until(lambda: finished(store, batch["id"]))
        row = store.batch(batch["id"])
        assert row["status"] == "completed" and (row["total"], row["completed"], row["failed"]) == (61, 60, 1)
        assert row["in_progress_at"] and row["finalizing_at"] and row["completed_at"]
        assert (row["input_tokens"], row["output_tokens"]) == (120, 180)
        out = output(store, batch["id"])
        assert sorted(o["custom_id"] for o in out) == sorted(f"a{i}" for i in range(60))
        assert all(o["response"]["body"]["choices"][0]["text"] == o["custom_id"].upper() for o in out)
        [err] = output(store, batch["id"], "error_file_id")
        assert err["custom_id"] == "bad0" and err["response"]["status_code"] == 400
        assert err["response"]["body"]["error"]["message"] == "refused"
        assert server.engine.peak == flow.window(MAX_SEQS, 1)  # filled, never past it
        assert sorted(server.started) == sorted([f"a{i}" for i in range(60)] + ["bad0"])  # each once

    run(check, tmp_path)


def test_no_line_starts_while_the_engine_reports_the_headroom_waiting_or_while_draining(tmp_path):
    async def check(store, runner, server):
        server.engine.waiting = flow.headroom(MAX_SEQS)  # live requests wait already
        server.engine.streams.update({-i: "live" for i in range(1, 5)})
        batch = create(store, batch_file("a", 20))
        runner.start()
        runner.add(batch)
        await asyncio.sleep(0.3)
        assert server.started == []
        server.engine.waiting = 0
        await until(lambda: len(server.started) > 0)
        # the live sequences count against the window: the batch adds only the rest
        assert server.engine.peak == flow.window(MAX_SEQS, 1)
        server.draining = True
        await asyncio.sleep(0.1)
        count = len(server.started)
        await asyncio.sleep(0.3)
        assert len(server.started) == count < 20 and store.batch(batch["id"])["status"] == "in_progress"

    run(check, tmp_path, FakeServer(hold=0.05))


def test_batches_share_the_engine_in_arrival_order(tmp_path):
    async def check(store, runner, server):
        first, second = create(store, batch_file("a", 40)), create(store, batch_file("b", 10))
        runner.start()  # both resume at start, oldest first
        await until(lambda: finished(store, second["id"]))
        assert finished(store, first["id"])
        assert server.started.index("b0") >= 40 - flow.window(MAX_SEQS, 1)  # a's lines went first
        assert all(server.started.index(f"a{i}") < server.started.index(f"a{i + 1}") for i in range(39))

    run(check, tmp_path)


def test_a_resumed_batch_runs_only_its_pending_lines(tmp_path):
    async def check(store, runner, server):
        batch = create(store, batch_file("a", 10))
        store.set_status(batch["id"], "in_progress")
        # an earlier launch finished lines 1-4, then died with 5 and 6 in flight
        store.record([Result(batch["seq"], n, True, lines.result(f"a{n - 1}", 200, {"id": "old"})) for n in range(1, 5)])
        runner.start()
        await until(lambda: finished(store, batch["id"]))
        assert sorted(server.started) == [f"a{i}" for i in range(4, 10)]
        out = output(store, batch["id"])
        assert sorted(o["custom_id"] for o in out) == [f"a{i}" for i in range(10)]
        assert [o["response"]["request_id"] for o in out[:4]] == ["old"] * 4  # kept as they were

    run(check, tmp_path)


def test_a_line_that_failed_on_a_dying_replica_runs_again(tmp_path):
    async def check(store, runner, server):
        server.dead_once = {"a3"}
        batch = create(store, batch_file("a", 8))
        runner.start()
        runner.add(batch)
        await until(lambda: finished(store, batch["id"]))
        assert server.started.count("a3") == 2
        assert store.batch(batch["id"])["completed"] == 8 and len(output(store, batch["id"])) == 8

    run(check, tmp_path)


def test_cancel_aborts_the_lines_in_flight_and_keeps_those_done(tmp_path):
    async def check(store, runner, server):
        batch = create(store, batch_file("a", 200))
        runner.start()
        runner.add(batch)
        await until(lambda: store.batch(batch["id"])["completed"] >= 20)
        row = await runner.cancel(batch["id"])
        assert row["status"] == "cancelling" and row["cancelling_at"]
        await until(lambda: finished(store, batch["id"]))
        row = store.batch(batch["id"])
        assert row["status"] == "cancelled" and 20 <= row["completed"] < 200
        assert not server.engine.streams  # nothing left running
        assert len(output(store, batch["id"])) == row["completed"]
        count = len(server.started)
        await asyncio.sleep(0.2)
        assert len(server.started) == count

    run(check, tmp_path, FakeServer(hold=0.02))


def test_a_batch_whose_input_file_is_gone_fails(tmp_path):
    async def check(store, runner, server):
        batch = create(store, batch_file("a", 3))
        store.path(batch["input_file_id"]).unlink()
        runner.start()
        await until(lambda: finished(store, batch["id"]))
        row = store.batch(batch["id"])
        assert row["status"] == "failed" and row["failed_at"]
        assert json.loads(row["errors"])[0]["code"] == "input_file_unreadable" and server.started == []

    run(check, tmp_path)
