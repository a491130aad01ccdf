"""Sockets between toka's processes: a private ipc folder, typed sockets and the XPUB handshake.

PUB/SUB drops messages sent before a subscriber joins and when a high-water mark is hit. So every
publisher is an XPUB that waits until all expected subscribers are counted in before its first
message, and sets XPUB_NODROP so a full queue blocks instead of dropping. Step ids on plans and
events turn any remaining loss into a fatal error rather than silent corruption.

Inside a host the sockets are ipc in a private folder. Between hosts they are tcp, and every tcp
socket runs ZeroMQ's CURVE: both key pairs derive from the cluster's shared secret, the binding side
admits only the client key (a ZAP handler) and both sides log a refused handshake. A process
without the secret can then neither connect nor be connected to, so it can neither send a plan nor
read a token.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable

import msgspec
import zmq
from zmq.utils import z85
from zmq.utils.monitor import recv_monitor_message

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
    """One zmq socket bound to the message union it carries. A tcp endpoint (another host's) is
    secured with CURVE from `key`, the cluster secret; without one it is refused. When binding,
    `endpoint` may name port 0: `self.endpoint` is then the port the system chose. When connecting, it
    may be a list: one socket, a connection to each."""

    def __init__(self, ctx: zmq.Context, kind: int, endpoint: str | list[str], union, bind: bool, key: bytes = b""):
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
        endpoints = [endpoint] if isinstance(endpoint, str) else endpoint
        if any(e.startswith("tcp://") for e in endpoints):
            secure(self.sock, key, server=bind)
        for e in endpoints:
            (self.sock.bind if bind else self.sock.connect)(e)
        self.decoder = protocol.decoder(union) if union is not None else None

    @property
    def endpoint(self) -> str:
        """The endpoint last bound, with the port the system chose."""
        return self.sock.getsockopt_string(zmq.LAST_ENDPOINT)

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
        wait_subscribers([self.sock], count, timeout, name)

    def close(self) -> None:
        self.sock.close(0)


class Fanout:
    """One publisher's messages to subscribers behind several XPUB channels (this host's ranks over
    ipc, other hosts' over tcp): the same bytes to each, one handshake over all of them."""

    def __init__(self, channels: list[Channel]):
        self.socks = [c.sock for c in channels]

    def send(self, msg: msgspec.Struct) -> None:
        data = protocol.encode(msg)
        for sock in self.socks:
            sock.send(data, copy=False)

    def wait_subscribers(self, count: int, timeout: float, name: str) -> None:
        wait_subscribers(self.socks, count, timeout, name)


def wait_subscribers(socks: list[zmq.Socket], count: int, timeout: float, name: str) -> None:
    """XPUB handshake: returns once `count` subscriptions arrived on the sockets together; each SUB
    subscribes once."""
    deadline = time.monotonic() + timeout
    poller = zmq.Poller()
    for sock in socks:
        poller.register(sock, zmq.POLLIN)
    seen = 0
    while seen < count:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"{name}: {seen} of {count} subscribers joined in {timeout:.0f}s")
        for sock, _ in poller.poll(int(left * 1000)):
            if sock.recv()[:1] == b"\x01":
                seen += 1
    log.debug("%s: %d subscribers joined", name, count)


# ---- CURVE between hosts ------------------------------------------------------------------------
@functools.lru_cache
def curve_keys(secret: bytes) -> dict[str, tuple[bytes, bytes]]:
    """(public, secret) key pairs, z85, of the binding ("server") and the connecting ("client") side,
    both derived from the cluster secret: every node computes the same four keys and needs no other."""
    pairs = {}
    for role in ("server", "client"):
        private = z85.encode(hashlib.sha256(b"toka curve " + role.encode() + b"\0" + secret).digest())
        pairs[role] = (zmq.curve_public(private), private)
    return pairs


def secure(sock: zmq.Socket, key: bytes, server: bool, on_refused=None) -> None:
    """CURVE on `sock` before it binds (server) or connects (client), and a log line for every
    handshake it refuses or is refused at (see watch_handshakes)."""
    if not key:
        raise ValueError("a tcp socket needs the cluster key (--cluster-key-file or $TOKA_CLUSTER_KEY)")
    keys = curve_keys(key)
    if server:
        admit_only(sock.context, keys["client"][0])
        sock.curve_server = True
        sock.curve_publickey, sock.curve_secretkey = keys["server"]
    else:
        sock.curve_serverkey = keys["server"][0]
        sock.curve_publickey, sock.curve_secretkey = keys["client"]
    watch_handshakes(sock, on_refused)


ZAP_ENDPOINT = "inproc://zeromq.zap.01"  # where libzmq asks a context's CURVE servers' questions


def admit_only(ctx: zmq.Context, client_public: bytes) -> None:
    """Answers the ZAP requests of `ctx`'s CURVE servers (a thread; one handler a context, so a second
    call finds the address taken and returns): only the client key derived from the cluster secret
    gets in. A peer reaches this only if it knew the server's key, itself derived from the secret."""
    sock = zmq.Context.shadow(ctx.underlying).socket(zmq.REP)
    try:
        sock.bind(ZAP_ENDPOINT)
    except zmq.ZMQError as e:
        sock.close(0)
        if e.errno == zmq.EADDRINUSE:
            return
        raise
    allowed = z85.decode(client_public)

    def answer() -> None:
        try:
            while True:
                version, request, _domain, address, _identity, mechanism, *credentials = sock.recv_multipart()
                ok = mechanism == b"CURVE" and credentials == [allowed]
                if not ok:
                    log.warning("refused a connection from %s: its CURVE key is not this cluster's",
                                address.decode(errors="replace"))
                sock.send_multipart([version, request, b"200" if ok else b"400",
                                     b"OK" if ok else b"not this cluster's key", b"", b""])
        except zmq.ContextTerminated:
            pass
        finally:
            sock.close(0)

    threading.Thread(target=answer, name="zap", daemon=True).start()


HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                    | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
REFUSAL_LOG_INTERVAL = 10.0  # seconds: a peer retrying with a wrong key logs once in this, not at every retry


def watch_handshakes(sock: zmq.Socket, on_refused=None) -> None:
    """Logs the failed CURVE handshakes of `sock` (from a thread reading its monitor): on a binding
    socket a peer that lacks the cluster key, on a connecting one a peer that refused ours.
    `on_refused(endpoint)` is then called in that thread."""
    address = f"inproc://toka-monitor-{id(sock)}"
    sock.monitor(address, HANDSHAKE_FAILED)
    pair = zmq.Context.shadow(sock.context.underlying).socket(zmq.PAIR)
    pair.connect(address)
    refusal = ("refused a connection at %s: the peer does not hold this cluster's key" if sock.curve_server else
               "%s refused our CURVE handshake: the two nodes do not share the cluster key")

    def follow() -> None:
        last, quiet = 0.0, 0
        try:
            while True:
                event = recv_monitor_message(pair)
                endpoint = event["endpoint"].decode(errors="replace")
                if time.monotonic() - last >= REFUSAL_LOG_INTERVAL:
                    more = f" ({quiet} more since the last report)" if quiet else ""
                    log.error(refusal + " (--cluster-key-file or $TOKA_CLUSTER_KEY)%s", endpoint, more)
                    last, quiet = time.monotonic(), 0
                else:
                    quiet += 1
                if on_refused is not None:
                    on_refused(endpoint)
        except zmq.ZMQError:  # the context ended or the socket closed
            pass
        finally:
            pair.close(0)

    threading.Thread(target=follow, name="handshakes", daemon=True).start()


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


def start_child(cfg, name: str, target, *args):
    """Starts `target(cfg, *args)` in a fresh (spawned) process named `name`. The child inherits the
    blocked mask: a stop signal sent while it imports waits until it can ignore it
    (leave_stop_signals_to_launcher); here it waits only for start() to return."""
    import multiprocessing as mp

    proc = mp.get_context("spawn").Process(target=target, args=(cfg, *args), name=name)
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        proc.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    log.info("started %s pid %d", name, proc.pid)  # supervisors and tests find the children here
    return proc


def kill_all(procs) -> None:
    for p in procs:
        if p.is_alive():
            p.kill()
    for p in procs:
        p.join(5)


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


STOP_FIGURES_ENV = "TOKA_STOP_FIGURES"


def write_stop_figures(name: str, figures: dict) -> None:
    """With TOKA_STOP_FIGURES=DIR in the environment, writes DIR/<name>.json: what a process measured
    of its own host time over the run (the figures it also logs at its stop), as data for benchmarks
    (tools/bench.py) rather than a log line for them to parse."""
    folder = os.environ.get(STOP_FIGURES_ENV)
    if not folder:
        return
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{name}.json")
    with open(path + ".tmp", "wb") as f:
        f.write(msgspec.json.encode(figures))
    os.replace(path + ".tmp", path)  # a reader never sees half a file


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


def run_measured(name: str, body: Callable[[], dict]) -> None:
    """Runs a process's main loop `body` as `profiled` does and writes the host figures it returns
    (write_stop_figures): the engine's processes measured the one way."""
    with profiled(name):
        figures = body()
    write_stop_figures(name, figures)
