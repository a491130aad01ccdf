"""`toka-batch -i requests.jsonl -o results.jsonl [any toka-launch flag]`: a batch file run offline,
through a toka-launch of its own.

Every line is checked first, by the rules the server's batches use (lines.py), and a bad one stops
the run before anything starts. toka-launch then starts with the other flags on a free local port,
in a process group of its own (stopped with toka-batch, also on Ctrl-C; it gets SIGTERM should
toka-batch die), its log in a temporary file. Once it serves, the lines go through its HTTP API,
flow.window() of them in flight, and each answer is appended to the output file as it arrives, in
the server's output line format: successes and API errors alike, in the order they finish. stderr
shows a progress bar: lines, tokens/s, time left.

Run again with the same -o, it skips the custom_ids already there, so an interrupted run resumes
where it stopped. A line is written only once answered; an engine that fails leaves its lines for
the next run (exit 1).
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from toka.batches import flow, lines

PR_SET_PDEATHSIG = 1
RETRY_AFTER = 1.0  # seconds before a line refused with 429 is sent again
STOP_TIMEOUT = 60.0  # seconds toka-launch gets to drain before it is killed


class Stopped(Exception):
    """The run cannot go on: the engine failed or went away."""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        "toka-batch", description="Run a JSONL file of OpenAI batch requests through toka-launch, resumably. Every "
        "flag besides -i and -o goes to toka-launch (toka-launch --help lists them).")
    parser.add_argument("-i", "--input", required=True, type=Path, help="the requests, one JSON object a line")
    parser.add_argument("-o", "--output", required=True, type=Path,
                        help="results are appended here; the custom_ids it holds already are skipped")
    args, launch_flags = parser.parse_known_args(argv)
    from toka.config import make_parser

    cfg = make_parser().parse_args(launch_flags)  # a bad flag stops here, before any work
    try:
        todo, total = plan(args.input, args.output)
    except (OSError, lines.LineError) as e:  # exit 2, as toka-launch for a bad flag
        say(f"error: {args.input}: {e}" if isinstance(e, lines.LineError) else f"error: {e}")
        sys.exit(2)
    done = total - len(todo)
    if done:
        say(f"{done} of {total} lines are in {args.output} already; running the other {len(todo)}")
    if not todo:
        return
    window = flow.window(max_seqs(cfg), cfg.dp)
    key = cfg.api_key or os.environ.get("TOKA_API_KEY")
    sys.exit(asyncio.run(Run(args.input, args.output, todo, total, launch_flags, window, key).main()))


def plan(input_path: Path, output: Path) -> tuple[list[tuple[int, int, int]], int]:
    """The lines still to run, (number, offset, length), and how many request lines there are. Cuts
    off a last output line that a kill left without its newline."""
    answered: set[str] = set()
    if output.exists():
        with open(output, "r+b") as f:
            answered, end = lines.answered(f)
            f.truncate(end)
    with open(input_path, "rb") as f:
        index = list(lines.scan(f, lines.ENDPOINTS))
    return [(n, offset, length) for n, offset, length, cid in index if cid not in answered], len(index)


def max_seqs(cfg) -> int:
    """toka-launch's --max-seqs, as it resolves the default."""
    if cfg.max_seqs:
        return cfg.max_seqs
    import torch

    return 2048 if cfg.device == "cuda" or (cfg.device is None and torch.cuda.is_available()) else 64


def say(message: str) -> None:
    print(f"toka-batch: {message}", file=sys.stderr, flush=True)


class Run:
    def __init__(self, input_path: Path, output: Path, todo, total: int, launch_flags: list[str], window: int,
                 key: str | None):
        self.input, self.output, self.todo = input_path, output, todo
        self.launch_flags, self.window = launch_flags, window
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.progress = Progress(len(todo), total - len(todo), total)

    async def main(self) -> int:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        signals = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, lambda sig=sig: (signals.setdefault("sig", sig), task.cancel()))
        port = free_port()
        log = tempfile.NamedTemporaryFile("w+b", prefix="toka-batch-", suffix=".log", delete=False)
        # a data folder of its own: the server's batches elsewhere are not this run's to resume
        data = tempfile.mkdtemp(prefix="toka-batch-data-")
        proc = launch([*self.launch_flags, "--data-dir", data], port, log)
        say(f"started toka-launch {' '.join(self.launch_flags)} on port {port}, pid {proc.pid} (its log: {log.name})")
        code = 0
        try:
            base = f"http://127.0.0.1:{port}"
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
            connector = aiohttp.TCPConnector(limit=self.window)
            async with aiohttp.ClientSession(base, headers=self.headers, timeout=timeout, connector=connector) as http:
                await self.ready(http, proc)
                self.progress.start()
                say(f"toka-launch serves; {len(self.todo)} lines to run, up to {self.window} at once")
                await self.feed(http)
            self.progress.finish(f"every line of {self.input} is in {self.output}")
        except asyncio.CancelledError:
            self.progress.finish(f"interrupted; run again with -o {self.output} to go on")
            code = 128 + signals.get("sig", signal.SIGINT)
        except Stopped as e:
            self.progress.finish(f"stopped: {e}; run again with -o {self.output} to go on")
            code = 1
        finally:
            returncode = stop(proc)
            if code == 1 or returncode not in (0, None):
                log.seek(0)
                sys.stderr.write(log.read()[-4000:].decode(errors="replace"))
            log.close()
            shutil.rmtree(data, ignore_errors=True)
            if code == 0:
                os.unlink(log.name)
        return code

    async def ready(self, http: aiohttp.ClientSession, proc: subprocess.Popen) -> None:
        while True:
            if proc.poll() is not None:
                raise Stopped(f"toka-launch exited with code {proc.returncode} before serving")
            try:
                async with http.get("/health") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.25)

    async def feed(self, http: aiohttp.ClientSession) -> None:
        """Every line to run, `window` at a time; the first Stopped ends the run."""
        slots = asyncio.Semaphore(self.window)
        tasks: set[asyncio.Task] = set()
        failed: list[BaseException] = []

        def ended(t: asyncio.Task) -> None:
            tasks.discard(t)
            slots.release()
            if not t.cancelled() and t.exception() is not None:
                failed.append(t.exception())

        ticker = asyncio.ensure_future(self.progress.tick())
        try:
            with open(self.input, "rb") as f, open(self.output, "ab") as out:
                for number, offset, length in self.todo:
                    await slots.acquire()
                    if failed:
                        break
                    request = lines.parse(lines.read(f, offset, length), number, lines.ENDPOINTS)
                    task = asyncio.ensure_future(self.one(http, request, out))
                    tasks.add(task)
                    task.add_done_callback(ended)
                while tasks and not failed:
                    await asyncio.wait(set(tasks), return_when=asyncio.FIRST_EXCEPTION)
        finally:
            ticker.cancel()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if failed:
            raise failed[0]

    async def one(self, http: aiohttp.ClientSession, request: lines.Request, out) -> None:
        while True:
            try:
                async with http.post(request.url, data=bytes(request.body),
                                     headers={"Content-Type": "application/json"}) as r:
                    status, body = r.status, await r.json(content_type=None)
            except (aiohttp.ClientError, ValueError) as e:
                raise Stopped(f"toka-launch went away ({type(e).__name__}: {e})") from None
            if status == 429:  # its queue is full (another client?): this line waits its turn
                await asyncio.sleep(RETRY_AFTER)
                continue
            if status == 503:  # the engine failed or drains: the line did not run
                raise Stopped(body.get("error", {}).get("message", "toka-launch answered 503"))
            break
        out.write(lines.result(request.custom_id, status, body))
        out.flush()
        self.progress.add(status == 200, lines.usage(status, body)[2])


class Progress:
    """Lines done, tokens/s and the time left, on stderr: a bar redrawn in place on a terminal, a line
    every LOG_EVERY seconds otherwise."""

    LOG_EVERY = 10.0
    WIDTH = 30

    def __init__(self, todo: int, before: int, total: int):
        self.todo, self.before, self.total = todo, before, total
        self.done = self.errors = self.tokens = 0
        self.t0 = time.monotonic()
        self.tty = sys.stderr.isatty()

    def start(self) -> None:
        self.t0 = time.monotonic()

    def add(self, ok: bool, tokens: int) -> None:
        self.done += 1
        self.errors += not ok
        self.tokens += tokens

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.t0, 1e-9)
        finished = self.before + self.done
        filled = self.WIDTH * finished // max(self.total, 1)
        left = (self.todo - self.done) * elapsed / self.done if self.done else None
        errors = f" ({_count(self.errors, 'error')})" if self.errors else ""
        eta = f"{_duration(left)} left" if left is not None else "starting"
        return (f"[{'#' * filled}{'.' * (self.WIDTH - filled)}] {finished}/{self.total} lines{errors}  "
                f"{self.tokens / elapsed:,.0f} tok/s  {eta}")

    async def tick(self) -> None:
        while True:
            await asyncio.sleep(0.2 if self.tty else self.LOG_EVERY)
            sys.stderr.write(("\r" + self.line() + "\x1b[K") if self.tty else self.line() + "\n")
            sys.stderr.flush()

    def finish(self, message: str) -> None:
        elapsed = time.monotonic() - self.t0
        end = "\r" + self.line() + "\x1b[K\n" if self.tty else self.line() + "\n"
        sys.stderr.write(end)
        say(f"{self.done} lines run in {_duration(elapsed)} ({self.tokens / max(elapsed, 1e-9):,.0f} tok/s, "
            f"{_count(self.errors, 'error')}); {message}")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(flags: list[str], port: int, log) -> subprocess.Popen:
    """toka-launch with `flags` on 127.0.0.1:port (the last --host, --port, --data-dir win), leading a process
    group of its own, so that stop() reaches it and its ranks and a Ctrl-C reaches only toka-batch."""
    parent = os.getpid()

    def die_with_parent():  # runs in the child before exec: SIGTERM when toka-batch dies, however it dies
        if sys.platform.startswith("linux"):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # toka-batch died before that took effect
            os._exit(1)

    return subprocess.Popen([sys.executable, "-m", "toka.launch", *flags, "--host", "127.0.0.1", "--port", str(port)],
                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=die_with_parent)


def stop(proc: subprocess.Popen) -> int | None:
    """SIGTERM to toka-launch's group (it drains and exits), SIGKILL if it outlasts STOP_TIMEOUT."""
    if proc.poll() is not None:
        return proc.returncode
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        return proc.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait()


if __name__ == "__main__":
    main()
