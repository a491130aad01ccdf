"""The processes tools/gpu.py runs: each tool run is a Job in a process group of its own, so that
stopping the group stops everything the run started (a server, its scheduler and rank processes).
A group is stopped when its job ends, when it passes its timeout and when tools/gpu.py is
interrupted: nothing a job started outlives Runner.run or Runner.stop_all. Models writes the model
folders the parts run on."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

TIMED_OUT = 124  # the exit code of a job stopped at its timeout, as timeout(1) reports it
STOPPED = 130  # a job not started, or cut short, because the runner was stopping
GRACE_S = 45  # SIGTERM to SIGKILL: longer than toka-launch's default drain (30 s)
_say = threading.Lock()


def say(line: str) -> None:
    """A whole line to stdout, also when several threads report at once."""
    with _say:
        print(line, flush=True)


def py(module: str, *args) -> list[str]:
    """`python -m module args` with this interpreter."""
    return [sys.executable, "-m", module, *map(str, args)]


@dataclass
class Job:
    name: str
    argv: list[str]
    log: Path  # stdout and stderr
    cwd: Path
    timeout: float  # seconds
    env: dict[str, str] = field(default_factory=dict)  # set over this process's environment
    # the files (or folders) it writes its results to: removed before it starts, so that what is
    # found there afterwards is this run's
    results: tuple[Path, ...] = ()

    def command(self) -> str:
        """The job as a shell line (what --dry-run prints)."""
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items()))
        return f"(cd {shlex.quote(str(self.cwd))} && {env + ' ' if env else ''}{shlex.join(self.argv)})"


class Runner:
    """Runs jobs, or with dry_run only records and prints them. May be used from several threads."""

    def __init__(self, dry_run: bool = False):
        self.dry_run = dry_run
        self.asked: list[Job] = []  # every job asked for, in order
        self._live: dict[int, subprocess.Popen] = {}  # process group id -> its leader
        self._stopping = False  # set by stop_all: nothing starts after it
        # re-entrant: stop_all also runs in gpu.py's signal handler, on the thread that may hold it
        self._lock = threading.RLock()

    def run(self, jobs: list[Job]) -> list[int]:
        """Runs `jobs` at once and returns their exit codes (TIMED_OUT for one stopped at its
        timeout, STOPPED for one the runner's stop_all cut short or never started) when all have
        ended; each job's process group is stopped before it returns."""
        with self._lock:
            self.asked += jobs
        if self.dry_run:
            for job in jobs:
                say(job.command())
            return [0] * len(jobs)
        started = []
        try:
            for job in jobs:
                started.append((job, self._start(job), time.monotonic()))
            return [self._wait(*s) for s in started]
        finally:
            for _, proc, _ in started:
                self._stop(proc)

    @property
    def stopping(self) -> bool:
        return self._stopping

    def stop_all(self) -> None:
        """Stops every group still running and refuses new jobs (on an interrupt of tools/gpu.py)."""
        with self._lock:
            self._stopping = True
            procs = list(self._live.values())
        for proc in procs:
            self._stop(proc)

    def _start(self, job: Job) -> subprocess.Popen | None:
        with self._lock:  # under the lock: stop_all either sees the group or stops its start
            if self._stopping:
                return None
            for path in job.results:
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
            job.log.parent.mkdir(parents=True, exist_ok=True)
            with open(job.log, "w") as log:  # the child holds its own copy of the descriptor
                log.write(f"$ {job.command()}\n")
                log.flush()
                proc = subprocess.Popen(job.argv, cwd=job.cwd, env={**os.environ, **job.env},
                                        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
            self._live[proc.pid] = proc
        say(f"  {job.name}: started, log {job.log}")
        return proc

    def _wait(self, job: Job, proc: subprocess.Popen | None, start: float) -> int:
        if proc is None:
            return STOPPED
        try:
            rc = proc.wait(max(0.0, start + job.timeout - time.monotonic()))
        except subprocess.TimeoutExpired:
            self._stop(proc)
            rc = TIMED_OUT
        if self._stopping and rc != 0:
            rc = STOPPED
        took = time.monotonic() - start
        say(f"  {job.name}: " + (f"timed out after {job.timeout:.0f} s" if rc == TIMED_OUT else
                                 f"exit {rc} after {took:.0f} s"))
        return rc

    def _stop(self, proc: subprocess.Popen | None) -> None:
        """SIGTERM to the group (servers drain), SIGKILL to what is left after GRACE_S."""
        if proc is None:
            return
        group = proc.pid  # start_new_session: the leader's pid is the group's id
        if _group_alive(group, proc):
            _signal_group(group, signal.SIGTERM)
            deadline = time.monotonic() + GRACE_S
            while _group_alive(group, proc) and time.monotonic() < deadline:
                time.sleep(0.2)
            if _group_alive(group, proc):
                _signal_group(group, signal.SIGKILL)
                proc.wait()
        with self._lock:
            self._live.pop(group, None)


class Models:
    """Model folders under `root` (tools/make_model.py, bf16): SHAPE holds the config and tokenizer
    (for --load-format random), SHAPE-weights random weights too. Each is written to SHAPE.partial
    and renamed when whole, so that a folder that exists is complete."""

    def __init__(self, root: Path):
        self.root = root

    def path(self, shape: str, weights: bool = False) -> Path:
        return self.root / (f"{shape}-weights" if weights else shape)

    def missing(self, needed: list[tuple[str, bool]]) -> list[tuple[str, bool]]:
        """The (shape, weights) pairs of `needed` without a folder, once each."""
        return [(s, w) for s, w in dict.fromkeys(needed) if not (self.path(s, w) / "config.json").exists()]

    def write(self, needed: list[tuple[str, bool]], runner: Runner, timeout: float, logs: Path,
              tree: Path) -> list[str]:
        """Writes the missing folders at once (tools/make_model.py of `tree`); returns the names of
        those that failed."""
        todo = self.missing(needed)
        jobs = []
        for shape, weights in todo:
            name = self.path(shape, weights).name
            argv = py("tools.make_model", shape, self.root / f"{name}.partial", "--dtype", "bfloat16",
                      *([] if weights else ["--no-weights"]))
            jobs.append(Job(name, argv, logs / f"{name}.log", tree, timeout))
        failed = []
        for (shape, weights), job, rc in zip(todo, jobs, runner.run(jobs)):
            if rc:
                failed.append(job.name)
            elif not runner.dry_run:
                (self.root / f"{job.name}.partial").rename(self.path(shape, weights))
        return failed


def _group_alive(group: int, leader: subprocess.Popen) -> bool:
    leader.poll()  # reaps the leader once it has exited, so that a zombie does not count
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a member that changed its user: still there
        return True
    return True


def _signal_group(group: int, sig: int) -> None:
    try:
        os.killpg(group, sig)
    except ProcessLookupError:
        pass
