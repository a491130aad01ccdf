"""`toka-launch`: config -> processes -> READY -> serve -> supervise -> shut down.

The launcher hosts the HTTP server and starts one process per rank, then the scheduler. /health
answers 200 only after every process said READY. Any process dying means the engine is dead: open
requests fail, /health answers 503 and the launcher stops everything and exits non-zero. SIGTERM or
SIGINT drains: new requests get 503, running ones finish (up to --drain-timeout), then the ranks
stop at the same step and the launcher exits 0. The children ignore both signals, so one sent to the
whole process group (Ctrl-C, systemd, `docker stop`) drains the same way; a second SIGINT stops at
once, failing what still runs (exit 130).

With --nnodes, this is node 0; the launcher of every other node runs toka/nodes.py's NodeAgent, and
node 0 counts its ranks in and out as its own (see toka/nodes.py).
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import multiprocessing as mp
import multiprocessing.connection
import os
import signal
import socket
import sys
import time

import zmq
import zmq.asyncio

from toka import fabric, protocol
from toka.config import ConfigError, EngineConfig, parse_args
from toka.fabric import STOP_SIGNALS, make_run_dir, profiled, remove_run_dir, remove_stale_run_dirs, setup_logging

log = logging.getLogger("toka.launch")

LISTEN_BACKLOG = 65535
STARTUP_TIMEOUT = 1800.0  # loading weights and compiling kernels can take long on a cold machine
OPEN_FILES = 65536  # file descriptors wanted: one per connection
INTERRUPTED = 130  # the exit code of a program Ctrl-C stopped, as shells report it


class LaunchError(Exception):
    pass


class Launcher:
    def __init__(self, cfg: EngineConfig):
        self.cfg = cfg
        self.procs: list[mp.Process] = []
        self.replica_of: dict[str, int] = {}  # process name -> its replica (other nodes' ranks too)
        self.leader = None  # the link to the other nodes, with --nnodes
        self.stopping = False
        self.interrupted = False  # a second SIGINT: stop_now() ends the run
        self.exit_code = 0
        self.done = asyncio.Event()

    async def run(self) -> int:
        from aiohttp import web
        from transformers import AutoTokenizer

        from toka.server.app import Server
        from toka.server.engine_client import EngineClient
        from toka.server.replicas import Replicas

        cfg = self.cfg
        tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer_path)
        # every replica's sockets exist before its processes start: they subscribe to them
        clients = [EngineClient(cfg.for_replica(k)) for k in range(cfg.dp)]
        self.server = Server(cfg, tokenizer, Replicas(clients, cfg.page_size, fail_fast=cfg.dp_fail_fast))
        runner = web.AppRunner(self.server.app(), handler_cancellation=True, access_log=None)
        await runner.setup()
        # early: /health says 503 while loading. The accept queue holds a burst of connections (aiohttp's
        # default, 128, drops the SYNs of a larger one, and each dropped client waits a second or more
        # to retry); the kernel caps it at net.core.somaxconn.
        await web.TCPSite(runner, cfg.host, cfg.port, backlog=LISTEN_BACKLOG).start()
        ctx = zmq.asyncio.Context()
        self.control = ctx.socket(zmq.PULL)
        self.control.bind(cfg.endpoint("control"))
        engine = self.server.engine
        loop = asyncio.get_running_loop()
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, self.on_signal, sig)
        try:
            await self.start_processes()
        except LaunchError as e:
            self.exit_code = 0 if self.stopping else 1  # SIGTERM during start-up: a clean stop, not a failure
            if self.exit_code:
                log.error("launch failed: %s", e)
            self.kill_all()
            await runner.cleanup()
            self.close_link()
            return self.exit_code
        self.server.start()
        log.info("ready: serving %s from %s on http://%s:%d/v1 (max_model_len %d, %d KV tokens)",
                 " ".join(cfg.served_names), cfg.model, cfg.host, cfg.port, cfg.max_model_len, cfg.kv_cache_tokens)
        watcher = asyncio.ensure_future(self.watch())
        await self.done.wait()
        watcher.cancel()
        await runner.cleanup()
        engine.close()
        self.close_link()
        return self.exit_code

    # ---- start-up ------------------------------------------------------------------------------
    def spawn(self, cfg: EngineConfig, name: str, target, *args) -> None:
        self.replica_of[name] = cfg.replica
        self.procs.append(fabric.start_child(cfg, name, target, *args))

    async def wait_ready(self, names: set[str]) -> dict[str, protocol.Ready]:
        decoder = protocol.decoder(protocol.ControlMsg)
        ready: dict[str, protocol.Ready] = {}
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while set(ready) != names:
            for p in self.procs:
                if p.exitcode is not None:
                    raise LaunchError(f"{p.name} exited with code {p.exitcode} during start-up")
            if time.monotonic() > deadline:
                raise LaunchError(f"not ready after {STARTUP_TIMEOUT:.0f}s: {sorted(names - set(ready))}")
            if await self.control.poll(200):
                msg = decoder.decode(await self.control.recv())
                if isinstance(msg, protocol.Fatal):
                    raise LaunchError(f"{msg.name}: {msg.message}")
                ready[msg.name] = msg
        return ready

    async def start_processes(self) -> None:
        from toka import cluster
        from toka.scheduler.main import scheduler_main
        from workers.rank import rank_main

        cfg = self.cfg
        replicas = [cfg.for_replica(k) for k in range(cfg.dp)]
        names = {rc.replica: [rc.process_name(f"rank{r}") for r in range(cfg.ranks)] for rc in replicas}
        if cfg.nnodes > 1:
            from toka.nodes import Leader

            self.leader = Leader(cfg)
            try:
                await self.leader.start()
            except RuntimeError as e:
                raise LaunchError(f"--dist-init-addr {cfg.dist_init_addr}: torch.distributed's store cannot listen: "
                                  f"{e}") from None
        for rc, rank, node, name in cluster.placement(cfg):
            self.replica_of[name] = rc.replica
            if node == 0:
                self.spawn(replicas[rc.replica], name, rank_main, rank)
        ready = await self.wait_ready({n for ns in names.values() for n in ns})
        for rc in replicas:  # the tcp endpoints of ranks on other nodes (none on one host)
            rc.remote_plans = [ready[n].endpoints["plans"] for n in names[rc.replica] if ready[n].endpoints]
            rc.remote_events = ready[names[rc.replica][cfg.reporting_rank]].endpoints.get("events", "")
            if rc.remote_events:
                self.server.engine.clients[rc.replica].follow_events(rc.remote_events)
        # every rank sized its own cache; a replica's scheduler plans for its smallest, and one context
        # window holds for every replica
        for rc in replicas:
            rc.kv_cache_tokens = min(ready[n].info["kv_pages"] for n in names[rc.replica]) * cfg.page_size
            rc.cap_to_cache()
        cfg.kv_cache_tokens = sum(rc.kv_cache_tokens for rc in replicas)
        cfg.max_model_len = min(rc.max_model_len for rc in replicas)
        for rc in replicas:
            rc.max_model_len = cfg.max_model_len
            if cfg.dp > 1:
                log.info("replica %d: %s, %d KV tokens", rc.replica, self.devices(rc), rc.kv_cache_tokens)
            self.spawn(rc, rc.process_name("scheduler"), scheduler_main)
        await self.wait_ready({rc.process_name("scheduler") for rc in replicas})

    def devices(self, rc: EngineConfig) -> str:
        """Where a replica's ranks run: "GPUs 2-3", "cpu"; with --nnodes "node 1 GPUs 0-1", "node 1 cpu"."""
        nodes = sorted({rc.node_of(r) for r in range(rc.ranks)})
        parts = []
        for node in nodes:
            gpus = [rc.gpu(r) for r in range(rc.ranks) if rc.node_of(r) == node]
            where = f"GPUs {gpus[0]}-{gpus[-1]}" if rc.device == "cuda" else "cpu"
            parts.append(f"node {node} {where}" if rc.nnodes > 1 else where)
        return ", ".join(parts)

    # ---- supervision and shutdown --------------------------------------------------------------
    async def watch(self) -> None:
        """Waits for children to exit, a child's fatal report or a replica losing its token events.
        One replica failing takes only it out of service while others live (Replicas.fail_replica);
        the engine is dead when none is left, or at the first failure with --dp-fail-fast. Children
        exiting 0 at the end of a drain are no failure."""
        loop = asyncio.get_running_loop()
        engine = self.server.engine
        decoder = protocol.decoder(protocol.ControlMsg)
        fatal = asyncio.ensure_future(self.control.recv())
        exited = None
        while not engine.dead:
            if exited is None:  # one waiting thread at a time; it also sees a dead replica's processes end
                watched = [p for p in self.procs if p.exitcode is None]
                exited = loop.run_in_executor(None, multiprocessing.connection.wait, [p.sentinel for p in watched])
            changed = asyncio.ensure_future(engine.changed.wait())
            await asyncio.wait([exited, fatal, changed], return_when=asyncio.FIRST_COMPLETED)
            changed.cancel()
            if self.interrupted:
                fatal.cancel()
                return  # stop_now() killed them
            failed: dict[int, str] = {}
            if fatal.done():
                msg = decoder.decode(fatal.result())
                for k in self.replicas_of(msg.name):
                    failed[k] = f"{msg.name} failed: {getattr(msg, 'message', '')}"
                fatal = asyncio.ensure_future(self.control.recv())
            if exited.done():
                ended = [p for p in watched if p.sentinel in exited.result()]
                exited = None
                for p in ended:  # the sentinel closes a moment before the exit code can be read
                    p.join(1)
                if self.stopping and all(p.exitcode == 0 for p in ended):
                    fatal.cancel()
                    return  # the drain stopped them
                for p in ended:
                    if engine.live[self.replica_of[p.name]]:
                        failed.setdefault(self.replica_of[p.name], f"{p.name} exited with code {p.exitcode}")
            engine.changed.clear()
            for k, reason in failed.items():
                engine.fail_replica(k, reason)
            for p in self.procs:  # a replica out of service stops: the rest of it cannot serve alone
                if not engine.live[self.replica_of[p.name]] and p.is_alive():
                    p.kill()
            if self.leader is not None:  # and so does its part on other nodes
                for k, live in enumerate(engine.live):
                    if not live:
                        self.leader.stop_replica(k)
        fatal.cancel()
        log.error("engine dead: %s", engine.dead)
        self.exit_code = 1
        if self.stopping:
            return  # shutdown() sees the engine dead and finishes the job
        self.stopping = True
        self.kill_all()  # the rest cannot serve without the dead one
        await self.let_errors_out(at_least=0.5, at_most=5)  # health checks see 503 before the listener closes
        self.done.set()

    def replicas_of(self, name: str) -> list[int]:
        """The replicas a failure of `name` takes down: a process's own, or every one on a lost node."""
        if name in self.replica_of:
            return [self.replica_of[name]]
        return self.leader.replicas_on(name) if self.leader is not None else [0]

    def on_signal(self, sig: int) -> None:
        if not self.stopping:
            asyncio.ensure_future(self.shutdown())
        elif sig == signal.SIGINT and not self.interrupted:
            # Ctrl-C again: whoever pressed it will not wait for the drain. A second SIGTERM does not
            # cut the drain short: a supervisor may send one to the launcher and one to its group.
            asyncio.ensure_future(self.stop_now())

    async def stop_now(self) -> None:
        self.interrupted = True
        self.exit_code = INTERRUPTED  # before any await: shutdown() may end the run first
        log.warning("interrupted during the drain: stopping now, failing %d sequences", len(self.server.engine.streams))
        self.server.engine.fail_all("the server was interrupted before this request finished")
        self.kill_all()
        await self.let_errors_out(at_least=0, at_most=2)
        self.done.set()

    async def let_errors_out(self, at_least: float, at_most: float) -> None:
        """Waits for the failed requests' error responses to go out before the listener closes."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < at_least or (self.server.active and time.monotonic() - t0 < at_most):
            await asyncio.sleep(0.05)

    async def shutdown(self) -> None:
        if self.stopping:
            return
        self.stopping = True
        self.server.draining = True
        engine = self.server.engine
        log.info("shutting down: draining %d sequences (up to %.0fs)", len(engine.streams), self.cfg.drain_timeout)
        deadline = time.monotonic() + self.cfg.drain_timeout
        while self.server.active and time.monotonic() < deadline and self.server.ready and not engine.dead:
            await asyncio.sleep(0.05)
        if self.server.ready and not engine.dead:
            # abort what outlived the timeout, so the scheduler goes idle and stops the ranks
            if engine.streams:
                log.warning("drain timeout: aborting %d sequences", len(engine.streams))
            engine.abort_all("the server shut down before this request finished")
            engine.drain()
            for p in self.procs:
                await asyncio.get_running_loop().run_in_executor(None, p.join, 10)
        while self.server.active and time.monotonic() < deadline + 5:  # the aborted requests' errors
            await asyncio.sleep(0.05)
        self.kill_all()
        self.done.set()

    def kill_all(self) -> None:
        if self.leader is not None:
            self.leader.shutdown(self.exit_code)
        fabric.kill_all(self.procs)

    def close_link(self) -> None:
        if self.leader is not None:
            self.leader.close()


def raise_open_files_limit() -> int:
    """Every connection holds a file descriptor: raises the soft limit to the hard one; returns it."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def open_files_warning(limit: int) -> str | None:
    if limit >= OPEN_FILES:
        return None
    return (f"open files are limited to {limit} by the system, so fewer than {limit:,} connections can be open "
            f"at once: raise the limit before launching (`ulimit -n {OPEN_FILES}` in the shell, which needs the "
            f"hard limit that high; LimitNOFILE={OPEN_FILES} in a systemd unit; --ulimit nofile={OPEN_FILES} "
            "for docker run)")


def check_listen_address(host: str, port: int) -> None:
    """Fails before the model loads if the HTTP server could not listen on host:port, and says why:
    an address that is no address, one this machine does not have, or a port taken."""
    if all(part.isdigit() for part in host.split(".")):  # meant as an IPv4 address, not a host name
        try:
            ipaddress.IPv4Address(host)
        except ValueError as e:
            raise ConfigError(f"--host {host} is not a valid IPv4 address: {e}") from None
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ConfigError(f"--host {host} is neither an IP address nor a name this machine resolves: "
                          f"{e.strerror}") from None
    for family, kind, proto, _, address in addresses:  # aiohttp listens on each of them
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as aiohttp does
            try:
                s.bind(address)
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    raise ConfigError(f"port {port} on {host} is already in use") from None
                if e.errno == errno.EADDRNOTAVAIL:
                    raise ConfigError(f"--host {host} is not an address of this machine") from None
                if e.errno == errno.EACCES:
                    raise ConfigError(f"--port {port} needs privileges this user lacks") from None
                raise ConfigError(f"cannot listen on --host {host} --port {port}: {e.strerror}") from None


def stop_before_start(cfg: EngineConfig, sig: int) -> None:
    """A stop signal before the event loop handles them (a hub download, imports, the tokenizer):
    no child runs yet, so the launch just ends. Not by KeyboardInterrupt, which torch's C++ start-up
    turns into abort()."""
    log.info("%s before the engine started: stopping", signal.Signals(sig).name)
    if cfg.run_dir:
        remove_run_dir(cfg.run_dir)
    os._exit(0)


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    setup_logging("launcher" if cfg.node_rank == 0 else f"node{cfg.node_rank}", cfg.log_level)
    for sig in STOP_SIGNALS:  # until Launcher.run() hands them to the event loop
        signal.signal(sig, lambda sig, _: stop_before_start(cfg, sig))
    try:
        if cfg.node_rank == 0:  # the others serve no HTTP
            check_listen_address(cfg.host, cfg.port)
        cfg.resolve()
    except ConfigError as e:
        print(f"toka-launch: error: {e}", file=sys.stderr)
        sys.exit(2)
    if cfg.device == "cpu":
        # The ranks' OpenMP threads share the cores with the server, the scheduler and each other;
        # spinning while waiting (libgomp's default) then starves them all: steps get tens of times
        # slower. Sleeping waiters cost a little latency and avoid that. Set before ranks start.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if cfg.nnodes > 1:
        from toka.cluster import use_node_interface

        use_node_interface(cfg)
    if warning := open_files_warning(raise_open_files_limit()):
        log.warning(warning)
    remove_stale_run_dirs()
    cfg.run_dir = make_run_dir()
    try:
        import uvloop

        if cfg.node_rank == 0:
            with profiled("server"):
                code = uvloop.run(Launcher(cfg).run())
        else:
            from toka.nodes import NodeAgent

            code = uvloop.run(NodeAgent(cfg).run())
    finally:
        remove_run_dir(cfg.run_dir)
    sys.exit(code)


if __name__ == "__main__":
    main()
