"""Sockets between toka's processes: a private ipc folder, typed sockets and the XPUB handshake.

PUB/SUB drops messages sent before a subscriber joins and when a high-water mark is hit. So every
publisher is an XPUB that waits until all expected subscribers are counted in before its first
message, and sets XPUB_NODROP so a full queue blocks instead of dropping. Step ids on plans and
events turn any remaining loss into a fatal error rather than silent corruption.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import tempfile
import time

import msgspec
import zmq

from toka import protocol

log = logging.getLogger(__name__)

# Deep enough for the scheduler's run-ahead and bursts of results; NODROP blocks past it.
HWM = 1 << 14


PID_FILE = "launcher.pid"


def make_run_dir() -> str:
    """A folder only this user can enter (mkdtemp creates it 0700) for the launch's ipc sockets,
    marked with the launcher's pid so a later launch can remove it if the launcher was killed."""
    path = tempfile.mkdtemp(prefix="toka-")
    with open(os.path.join(path, PID_FILE), "w") as f:
        f.write(str(os.getpid()))
    return path


def remove_stale_run_dirs() -> None:
    """Removes run folders of launchers that no longer exist (killed before they could clean up)."""
    import glob

    for path in glob.glob(os.path.join(tempfile.gettempdir(), "toka-*")):
        try:
            with open(os.path.join(path, PID_FILE)) as f:
                pid = int(f.read())
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except (OSError, ValueError):  # not ours, no pid file, or a live process of another user
            continue


def remove_run_dir(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


class Channel:
    """One zmq socket bound to the message union it carries."""

    def __init__(self, ctx: zmq.Context, kind: int, endpoint: str, union, bind: bool):
        self.sock = ctx.socket(kind)
        self.sock.setsockopt(zmq.LINGER, 0)
        if kind in (zmq.PUB, zmq.XPUB, zmq.PUSH):
            self.sock.setsockopt(zmq.SNDHWM, HWM)
        if kind in (zmq.SUB, zmq.PULL):
            self.sock.setsockopt(zmq.RCVHWM, HWM)
        if kind == zmq.XPUB:
            self.sock.setsockopt(zmq.XPUB_NODROP, 1)
            self.sock.setsockopt(zmq.XPUB_VERBOSE, 1)  # count every subscriber, not distinct topics
        if kind == zmq.SUB:
            self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        (self.sock.bind if bind else self.sock.connect)(endpoint)
        self.decoder = protocol.decoder(union) if union is not None else None

    def send(self, msg: msgspec.Struct) -> None:
        self.sock.send(protocol.encode(msg), copy=False)

    def recv(self, flags: int = 0):
        return self.decoder.decode(self.sock.recv(flags, copy=False).buffer)

    def poll(self, timeout_ms: int) -> bool:
        return bool(self.sock.poll(timeout_ms))

    def recv_all(self) -> list:
        """Every message already queued, without blocking."""
        out = []
        while self.sock.poll(0):
            out.append(self.recv())
        return out

    def wait_subscribers(self, count: int, timeout: float, name: str) -> None:
        """XPUB handshake: returns once `count` subscriptions arrived; each SUB subscribes once."""
        deadline = time.monotonic() + timeout
        seen = 0
        while seen < count:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{name}: {seen} of {count} subscribers joined in {timeout:.0f}s")
            if self.sock.poll(int(left * 1000)):
                if self.sock.recv()[:1] == b"\x01":
                    seen += 1
        log.debug("%s: %d subscribers joined", name, count)

    def close(self) -> None:
        self.sock.close(0)


# Ctrl-C in a terminal sends SIGINT to the whole process group; systemd, `docker stop` of a process
# tree and `timeout` send SIGTERM to every process. Only the launcher acts on them (it drains).
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def leave_stop_signals_to_launcher() -> None:
    """The first call of a child's process main. The launcher starts children with STOP_SIGNALS
    blocked (the mask survives exec), so one that came during the child's imports is still pending:
    ignoring drops it, and unblocking lets none through. The child still dies with the launcher
    (watch_parent) and stops when the launcher tells it to."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def watch_parent() -> None:
    """Dies with the parent: the kernel sends SIGKILL when the process that started us exits, so a
    killed launcher leaves no orphans behind."""
    import ctypes
    import multiprocessing

    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    # The parent may have died before prctl took effect; we were then reparented, to init or to a
    # subreaper, so compare with the pid multiprocessing (spawn) recorded rather than with 1.
    parent = multiprocessing.parent_process()
    if os.getppid() != (parent.pid if parent is not None else os.getppid()):
        os._exit(1)


def setup_logging(name: str, level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format=f"%(asctime)s {name} %(levelname)s %(name)s: %(message)s",
        force=True,
    )


@contextlib.contextmanager
def profiled(name: str):
    """With TOKA_PROFILE=DIR in the environment, runs the body under cProfile and writes
    DIR/<name>.prof (read it with `python -m pstats`): where each process spends its host time."""
    folder = os.environ.get("TOKA_PROFILE")
    if not folder:
        yield
        return
    import cProfile

    prof = cProfile.Profile()
    prof.enable()
    try:
        yield
    finally:
        prof.disable()
        os.makedirs(folder, exist_ok=True)
        prof.dump_stats(os.path.join(folder, f"{name}.prof"))
