"""The server's batch runner: a client of the engine like the HTTP routes. It runs each pending line
of every unfinished batch through `Server.respond` (the live routes' validation and response
building, without HTTP) and records each result in the store as it comes.

Flow control (flow.py): the runner keeps the engine's slots busy and at most `headroom` batch
sequences waiting per replica, topping up as each line ends; it adds nothing while the engine
reports more waiting than that, and nothing at all while the server drains. Live requests are
admitted as usual, so they queue behind no more than that headroom. Batches share the window in
arrival order: the oldest with a line left goes first.

Only the store knows which lines are done. A line in flight when the process ends (killed, drained
past the timeout, the engine dead) stays pending and runs again at the next start, which resumes
every unfinished batch. A line whose sequences failed on a replica that died while others live runs
again at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor

from toka.batches import flow, lines
from toka.batches.store import Result, Store
from toka.server.engine_client import EngineDead

log = logging.getLogger("toka.batches")

FETCH = 512  # pending lines read from the store at a time, per batch
START_ROUND = 32  # lines started before the runner yields, so their sequences count in the next look
TICK = 0.25  # seconds between looks at the engine while lines wait for room


class Job:
    """A batch being run: its pending lines not yet started, and those in flight."""

    def __init__(self, row: dict, input_path):
        self.id, self.seq, self.endpoint = row["id"], row["seq"], row["endpoint"]
        self.chat = self.endpoint == lines.CHAT
        self.input = open(input_path, "rb")
        self.queue: deque[tuple[int, int, int]] = deque()  # (number, offset, length), in line order
        self.fetched = 0  # line number up to which pending lines came from the store into the queue
        self.exhausted = False  # the store has no pending line past `fetched`
        self.inflight: dict[int, asyncio.Task] = {}
        self.unrecorded = 0  # results handed to the writer, not committed yet
        self.ending: str | None = None  # cancelled or failed: no line starts any more
        self.errors: list[dict] | None = None

    @property
    def idle(self) -> bool:
        """Nothing in flight and nothing on its way to the store."""
        return not self.inflight and not self.unrecorded


class BatchRunner:
    def __init__(self, store: Store, server):
        self.store = store
        self.server = server
        # every store write goes through this one thread, in order; reads happen on the event loop
        self.io = ThreadPoolExecutor(1, thread_name_prefix="toka-batches")
        self.jobs: dict[str, Job] = {}  # in arrival order
        self.results: list[Result] = []  # waiting for the writer
        self.running = False
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self._writer: asyncio.Task | None = None

    async def write(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.io, fn, *args)

    # ---- what the routes and the server call ----------------------------------------------------
    def start(self) -> None:
        """The server serves: resume what an earlier launch left unfinished, then feed the engine."""
        self.running = True
        self._spawn(self._run())

    def add(self, row: dict) -> None:
        """A batch just created (status validating)."""
        if self.running:
            self._spawn(self._take(row))

    async def cancel(self, batch_id: str) -> dict:
        """Stops a batch: no line starts, those in flight are aborted (they stay unrecorded), and once
        every result already in hand is committed the batch is cancelled."""
        row = await self.write(self.store.set_status, batch_id, "cancelling")
        job = self.jobs.get(batch_id)
        if job is None:  # not taken up yet (the server is still starting)
            return await self.write(self.store.set_status, batch_id, "cancelled")
        self._end(job, "cancelled")
        return row

    async def close(self) -> None:
        """At shutdown: aborts the lines in flight (they run again at the next start), commits the
        results in hand, closes the store."""
        self.running = False
        for task in list(self._tasks):
            task.cancel()
        for job in self.jobs.values():
            for task in job.inflight.values():
                task.cancel()
        await asyncio.gather(*self._tasks, *(t for j in self.jobs.values() for t in j.inflight.values()),
                             return_exceptions=True)
        if self._writer is not None:
            await asyncio.gather(self._writer, return_exceptions=True)
        if self.results:
            await self._commit()
        for job in self.jobs.values():
            job.input.close()
        await self.write(self.store.close)
        self.io.shutdown()

    @property
    def lines_in_flight(self) -> int:
        return sum(len(j.inflight) for j in self.jobs.values())

    # ---- feeding --------------------------------------------------------------------------------
    async def _run(self) -> None:
        for row in self.store.unfinished():
            if row["status"] == "cancelling":  # its lines in flight ended with the process
                await self.write(self.store.set_status, row["id"], "cancelled")
            else:
                await self._take(row)
        while True:
            if self.jobs:
                try:
                    await asyncio.wait_for(self._wake.wait(), TICK)
                except asyncio.TimeoutError:
                    pass
            else:
                await self._wake.wait()
            self._wake.clear()
            await self._feed()

    async def _take(self, row: dict) -> None:
        row = self.store.batch(row["id"])  # as it is now: a cancel may have come since it was read
        if row["status"] not in ("validating", "in_progress", "finalizing"):
            return
        path = self.store.path(row["input_file_id"])
        try:
            job = Job(row, path)
        except OSError as e:
            log.error("batch %s cannot read its input file: %s", row["id"], e)
            await self.write(self.store.set_status, row["id"], "failed",
                             [{"code": "input_file_unreadable", "message": f"the input file cannot be read: {e}",
                               "param": "input_file_id", "line": None}])
            return
        self.jobs[job.id] = job
        if row["status"] == "validating":
            await self.write(self.store.set_status, job.id, "in_progress")
        if row["status"] == "finalizing":
            job.exhausted = True
        log.info("batch %s: %d of %d lines to run", job.id, row["total"] - row["completed"] - row["failed"],
                 row["total"])
        self._check(job)
        self._wake.set()

    def room(self) -> int:
        """Sequences the batches may add now (flow.py): up to every slot and the headroom, and only
        while the schedulers report fewer than the headroom waiting."""
        server, engine = self.server, self.server.engine
        replicas = max(1, engine.live_count)
        headroom = flow.headroom(server.cfg.max_seqs) * replicas
        waiting = sum(stats.waiting for _, stats in engine.replica_stats())
        return min(flow.window(server.cfg.max_seqs, replicas) - len(engine.streams), headroom - waiting)

    async def _feed(self) -> None:
        server = self.server
        while not server.draining and server.ready and not server.engine.dead:
            room = min(self.room(), START_ROUND)
            started = 0
            while started < room and (picked := self._next()) is not None:
                self._start(*picked)
                started += 1
            if not started:
                return
            await asyncio.sleep(0)  # the new lines submit their sequences before the next look

    def _next(self) -> tuple[Job, tuple[int, int, int]] | None:
        """The next line to run: the oldest batch's with one left."""
        for job in list(self.jobs.values()):
            if job.ending:
                continue
            if not job.queue and not job.exhausted:
                batch = self.store.pending(job.seq, job.fetched, FETCH)
                job.queue.extend(batch)
                job.exhausted = len(batch) < FETCH
                if batch:
                    job.fetched = batch[-1][0]
            if job.queue:
                return job, job.queue.popleft()
            self._check(job)
        return None

    def _start(self, job: Job, item: tuple[int, int, int]) -> None:
        task = asyncio.ensure_future(self._line(job, item))
        job.inflight[item[0]] = task
        task.add_done_callback(lambda _: self._line_ended(job, item[0]))

    async def _line(self, job: Job, item: tuple[int, int, int]) -> None:
        number, offset, length = item
        try:
            request = lines.parse(lines.read(job.input, offset, length), number, (job.endpoint,))
        except (OSError, lines.LineError) as e:  # the input file changed under the batch
            self._end(job, "failed", [{"code": "input_file_unreadable", "message": str(e), "param": "input_file_id",
                                       "line": number}])
            return
        try:
            status, body = await self.server.respond(bytes(request.body), job.chat)
        except EngineDead:  # the line did not run: again now if the engine still serves, else next start
            if not (self.server.draining or self.server.engine.dead or job.ending):
                job.queue.appendleft(item)
            return
        result = Result(job.seq, number, status == 200, lines.result(request.custom_id, status, body),
                        *lines.usage(status, body))
        self.results.append(result)
        job.unrecorded += 1
        if self._writer is None or self._writer.done():
            self._writer = asyncio.ensure_future(self._write_results())

    def _line_ended(self, job: Job, number: int) -> None:
        job.inflight.pop(number, None)
        self._check(job)
        self._wake.set()

    # ---- recording and ending -------------------------------------------------------------------
    async def _write_results(self) -> None:
        """Commits the results in hand, again and again while more arrive meanwhile."""
        while self.results:
            await self._commit()

    async def _commit(self) -> None:
        taken, self.results = self.results, []
        try:
            await self.write(self.store.record, taken)
        except Exception as e:  # disk full, folder gone: the batches concerned cannot go on
            log.exception("recording batch results failed")
            for job in list(self.jobs.values()):
                if any(r.batch == job.seq for r in taken):
                    self._end(job, "failed", [{"code": "output_unwritable", "message": f"results cannot be "
                                               f"written: {type(e).__name__}: {e}", "param": None, "line": None}])
        for job in list(self.jobs.values()):  # _check removes the jobs that end
            job.unrecorded -= sum(r.batch == job.seq for r in taken)
            self._check(job)

    def _end(self, job: Job, status: str, errors: list[dict] | None = None) -> None:
        """No more lines of `job` start; those in flight are aborted."""
        if job.ending:
            return
        job.ending, job.errors = status, errors
        job.queue.clear()
        for task in job.inflight.values():
            task.cancel()
        self._check(job)

    def _check(self, job: Job) -> None:
        """Ends a batch once nothing of it is left to run or to record."""
        done = job.ending or (job.exhausted and not job.queue)
        if done and job.idle and self.jobs.get(job.id) is job and self.running:
            del self.jobs[job.id]
            job.input.close()
            self._spawn(self._finish(job))

    async def _finish(self, job: Job) -> None:
        if job.ending:
            await self.write(self.store.set_status, job.id, job.ending, job.errors)
        else:
            await self.write(self.store.set_status, job.id, "finalizing")
            await self.write(self.store.seal, job.id)
            await self.write(self.store.set_status, job.id, "completed")
        log.info("batch %s %s", job.id, job.ending or "completed")

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(_log_failure)


def _log_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("batch runner task failed", exc_info=task.exception())
