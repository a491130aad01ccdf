"""The link between node 0 and the other nodes of an engine across hosts (--nnodes).

Node 0's launcher (`Leader`) hosts torch.distributed's TCPStore at --dist-init-addr, binds a ROUTER
on its own address (tcp, port 0, CURVE) and leaves its endpoint in the store. Every other node's
toka-launch (`NodeAgent`) reads it there, connects a DEALER, and joins; node 0 checks that the node
was started with the same layout and welcomes it, and only then does the node start its ranks. Their
READY and failures travel to node 0 over the link, where they enter the launcher's control socket as
its own children's do: node 0 waits for every rank of every node before /health answers 200, and a
rank dying anywhere is a dead replica (or a dead engine) by the rules of one host.

Both sides send a heartbeat every HEARTBEAT seconds. A node silent for LOST_AFTER is gone (host or
network) and so is every replica with a rank on it; node 0 silent that long, and a node stops its
ranks and exits 1. Node 0 stops the other nodes' part of a dead replica (StopReplica), and at its end
every node (Shutdown, with node 0's exit code): after a drain the ranks have exited 0 on their own.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing.connection
import signal
import threading
import time

import msgspec
import zmq
import zmq.asyncio

from toka import cluster, protocol
from toka.config import EngineConfig
from toka.fabric import STOP_SIGNALS, kill_all, secure, start_child

log = logging.getLogger("toka.nodes")

HEARTBEAT = 0.5  # seconds between heartbeats, each way
LOST_AFTER = 5.0  # seconds without one: the other side is gone
JOIN_TIMEOUT = 60.0  # seconds a node waits for node 0 to answer its Join
LINGER_MS = 2000  # the last messages (Shutdown, Fatal) still go out while the process ends
SHUTDOWN_WAIT = 10.0  # seconds a node's ranks have to exit on their own once node 0 ends the run


class Leader:
    """Node 0's side of the link. Create, then `await start()` before its ranks start."""

    def __init__(self, cfg: EngineConfig):
        self.cfg = cfg
        # node -> {process name: replica} of the ranks it runs
        self.hosted: dict[int, dict[str, int]] = {n: {} for n in range(1, cfg.nnodes)}
        for rc, _, node, name in cluster.placement(cfg):
            if node:
                self.hosted[node][name] = rc.replica
        self.joined: dict[int, bytes] = {}  # node -> its routing id on the ROUTER
        self.seen: dict[int, float] = {}  # node -> time.monotonic() of its last heartbeat
        self.lost: set[int] = set()
        self.stopped: set[int] = set()  # replicas whose processes were told to stop
        self.ended = False
        self.decoder = protocol.decoder(protocol.NodeMsg)
        self.tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        """Opens torch.distributed's store and the link; raises RuntimeError if the store cannot listen."""
        cfg = self.cfg
        self.store = cluster.store(cfg, master=True)
        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, LINGER_MS)
        secure(self.sock, cfg.cluster_key, server=True)
        self.sock.bind(f"tcp://{cfg.node_addr}:0")
        endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        # node 0's control socket: what the nodes relay enters it as node 0's own children's messages do
        self.control = self.ctx.socket(zmq.PUSH)
        self.control.connect(cfg.endpoint("control"))
        self.store.set(cluster.LINK_KEY, endpoint)
        self.tasks = [asyncio.ensure_future(self._receive()), asyncio.ensure_future(self._beat())]
        log.info("waiting for nodes 1-%d: torch.distributed's store at %s, the fabric at %s", cfg.nnodes - 1,
                 cfg.dist_init_addr, endpoint)

    def replicas_on(self, name: str) -> list[int]:
        """The replicas a failure named `name` ("node N") takes down."""
        node = int(name.removeprefix("node "))
        return sorted(set(self.hosted.get(node, {}).values()))

    def stop_replica(self, replica: int) -> None:
        if replica in self.stopped:
            return
        self.stopped.add(replica)
        for node in self.joined:
            if replica in self.hosted[node].values():
                self._send(node, protocol.StopReplica(replica))

    def shutdown(self, code: int) -> None:
        """Every node stops its processes and exits with `code`."""
        if not self.ended:
            self.ended = True
            for node in self.joined:
                self._send(node, protocol.Shutdown(code))

    def close(self) -> None:
        for t in self.tasks:
            t.cancel()
        self.ctx.destroy(linger=LINGER_MS)

    def _send(self, node: int, msg) -> None:
        if node not in self.lost:
            self.sock.send_multipart([self.joined[node], protocol.encode(msg)])

    async def _receive(self) -> None:
        node_of = {}  # routing id -> node, once joined
        while True:
            frames = await self.sock.recv_multipart()
            peer, data = frames[0], frames[-1]
            try:
                msg = self.decoder.decode(data)
            except msgspec.DecodeError as e:
                log.warning("a node sent a message that does not decode: %s", e)
                continue
            if isinstance(msg, protocol.Join):
                if (reason := self._refusal(msg)) is not None:
                    log.error("refused node %d (%s): %s", msg.node, msg.address, reason)
                    self.sock.send_multipart([peer, protocol.encode(protocol.Refuse(reason))])
                    continue
                node_of[peer], self.joined[msg.node], self.seen[msg.node] = msg.node, peer, time.monotonic()
                self._send(msg.node, protocol.Welcome())
                log.info("node %d joined from %s", msg.node, msg.address)
                continue
            node = node_of.get(peer)
            if node is None:
                log.warning("a message from a node that has not joined: %s", type(msg).__name__)
            elif isinstance(msg, protocol.Heartbeat):
                self.seen[node] = time.monotonic()
            elif msg.name in self.hosted[node]:  # Ready or Fatal of one of its ranks
                await self.control.send(data)
            else:
                log.warning("node %d reported %s, which is not one of its processes", node, msg.name)

    def _refusal(self, join: protocol.Join) -> str | None:
        if join.node not in self.hosted:
            return f"--node-rank {join.node} is not among nodes 1-{self.cfg.nnodes - 1} of --nnodes {self.cfg.nnodes}"
        if join.node in self.joined:
            return f"node {join.node} has joined already"
        return cluster.flag_mismatch(cluster.shared_flags(self.cfg), join.flags)

    async def _beat(self) -> None:
        while True:
            now = time.monotonic()
            for node in list(self.joined):
                if node in self.lost:
                    continue
                if now - self.seen[node] > LOST_AFTER:
                    self.lost.add(node)
                    log.error("node %d lost: no heartbeat for %.0f s", node, LOST_AFTER)
                    fatal = protocol.Fatal(f"node {node}", f"no heartbeat for {LOST_AFTER:.0f} s: the host or its "
                                           "network is gone")
                    await self.control.send(protocol.encode(fatal))
                else:
                    self._send(node, protocol.Heartbeat(0))
            await asyncio.sleep(HEARTBEAT)


class NodeAgent:
    """toka-launch on a node other than 0: joins node 0, starts this node's ranks, relays their READY
    and failures, and stops them when node 0 says so or goes silent. `run()` returns the exit code."""

    def __init__(self, cfg: EngineConfig):
        self.cfg = cfg
        self.node = cfg.node_rank
        self.ranks = [(rc, rank, name) for rc, rank, node, name in cluster.placement(cfg) if node == self.node]
        self.procs: list = []
        self.replica_of: dict[str, int] = {}
        self.killed: set[str] = set()  # processes stopped here because their replica is out of service
        self.decoder = protocol.decoder(protocol.LeaderMsg)

    async def run(self) -> int:
        cfg = self.cfg
        loop = asyncio.get_running_loop()
        self.ended: asyncio.Future = loop.create_future()
        self.signalled = False
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, self.on_signal, sig)
        self.ctx = zmq.asyncio.Context()
        self.control = self.ctx.socket(zmq.PULL)
        self.control.bind(cfg.endpoint("control"))
        try:
            code = await self._serve(loop)
        finally:
            kill_all(self.procs)
            self.ctx.destroy(linger=LINGER_MS)
        return code

    async def _serve(self, loop) -> int:
        code = await self._join(loop)
        if code is not None:
            return code
        from workers.rank import rank_main

        log.info("joined node 0: starting %d ranks", len(self.ranks))
        for rc, rank, name in self.ranks:
            self.replica_of[name] = rc.replica
            self.procs.append(start_child(rc, name, rank_main, rank))
        self.node0_seen = time.monotonic()
        self.watcher = asyncio.ensure_future(self._watch(loop))
        tasks = [asyncio.ensure_future(t) for t in (self._relay(), self._listen(), self._beat())]
        try:
            return await self.ended
        finally:
            for t in [*tasks, self.watcher]:
                t.cancel()

    async def _join(self, loop) -> int | None:
        """Finds node 0 in the store at --dist-init-addr, connects the link and joins; None once
        welcomed, else the exit code (refused, not found, or stopped meanwhile)."""
        cfg = self.cfg
        log.info("node %d of %d: joining node 0 at %s (this node's fabric on %s)", self.node, cfg.nnodes,
                 cfg.dist_init_addr, cfg.node_addr)
        found = in_thread(loop, lambda: cluster.store(cfg).get(cluster.LINK_KEY).decode())
        await asyncio.wait([found, self.ended], return_when=asyncio.FIRST_COMPLETED)
        if self.ended.done():
            return self.ended.result()
        if found.exception() is not None:
            log.error("node 0 not found at --dist-init-addr %s: %s", cfg.dist_init_addr, found.exception())
            return 1
        endpoint = found.result()
        refused = loop.create_future()
        self.link = self.ctx.socket(zmq.DEALER)
        self.link.setsockopt(zmq.LINGER, LINGER_MS)
        secure(self.link, cfg.cluster_key, server=False,
               on_refused=lambda _: loop.call_soon_threadsafe(settle, refused, None))
        self.link.connect(endpoint)
        await self.link.send(protocol.encode(protocol.Join(self.node, cfg.node_addr, cluster.shared_flags(cfg))))
        answer = asyncio.ensure_future(self.link.recv())
        await asyncio.wait([answer, refused, self.ended], timeout=JOIN_TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
        if not answer.done():
            answer.cancel()
            if self.ended.done():
                return self.ended.result()
            if refused.done():
                log.error("node 0 at %s refused this node at the CURVE handshake: this node's cluster key is not "
                          "node 0's (--cluster-key-file or $TOKA_CLUSTER_KEY)", endpoint)
            else:
                log.error("node 0 at %s did not answer in %.0f s", endpoint, JOIN_TIMEOUT)
            return 1
        msg = self.decoder.decode(answer.result())
        if isinstance(msg, protocol.Refuse):
            log.error("node 0 refused this node: %s", msg.reason)
            return 1
        return None

    def end(self, code: int) -> None:
        if not self.ended.done():
            self.ended.set_result(code)

    def on_signal(self, sig: int) -> None:
        """Supervisors (SLURM, Kubernetes, systemd) stop every node at once: node 0 drains and then ends
        this one, so a stop signal here only sets a deadline on that. A second Ctrl-C stops at once."""
        if self.signalled:
            if sig == signal.SIGINT:
                self.end(130)
            return
        self.signalled = True
        wait = self.cfg.drain_timeout + 30
        log.info("%s: waiting up to %.0f s for node 0 to end the run", signal.Signals(sig).name, wait)
        asyncio.get_running_loop().call_later(wait, self.end, 0)

    async def _relay(self) -> None:
        """This node's ranks' READY and failures, as they are, to node 0."""
        while True:
            await self.link.send(await self.control.recv())

    async def _listen(self) -> None:
        while True:
            msg = self.decoder.decode(await self.link.recv())
            if isinstance(msg, protocol.Heartbeat):
                self.node0_seen = time.monotonic()
            elif isinstance(msg, protocol.StopReplica):
                self._stop_replica(msg.replica)
            elif isinstance(msg, protocol.Shutdown):
                # after a drain the ranks got their last plan and are exiting 0 on their own
                await asyncio.wait([self.watcher], timeout=SHUTDOWN_WAIT)
                self.end(msg.code if all(p.exitcode == 0 for p in self.procs) else 1)

    def _stop_replica(self, replica: int) -> None:
        for p in self.procs:
            if self.replica_of[p.name] == replica and p.is_alive():
                self.killed.add(p.name)
                p.kill()

    async def _beat(self) -> None:
        while True:
            if time.monotonic() - self.node0_seen > LOST_AFTER:
                log.error("node 0 lost: no heartbeat for %.0f s: stopping this node's ranks", LOST_AFTER)
                self.end(1)
                return
            await self.link.send(protocol.encode(protocol.Heartbeat(self.node)))
            await asyncio.sleep(HEARTBEAT)

    async def _watch(self, loop) -> None:
        """A rank that exits with an error: node 0 hears of it, and the rest of its replica here stops.
        Once no replica of this node runs, the node is done."""
        while running := [p for p in self.procs if p.exitcode is None]:
            ready = await loop.run_in_executor(None, multiprocessing.connection.wait, [p.sentinel for p in running])
            for p in running:
                if p.sentinel not in ready:
                    continue
                p.join(1)  # the sentinel closes a moment before the exit code can be read
                if p.exitcode != 0 and p.name not in self.killed:
                    fatal = protocol.Fatal(p.name, f"exited with code {p.exitcode} on node {self.node}")
                    await self.link.send(protocol.encode(fatal))
                    self._stop_replica(self.replica_of[p.name])
        if any(p.exitcode != 0 for p in self.procs):
            log.error("no replica of node %d runs any longer", self.node)
            self.end(1)
        # all exited 0: the end of a drain, and node 0's Shutdown follows


def settle(future: asyncio.Future, result, error: BaseException | None = None) -> None:
    """Completes `future` unless it is done already (call it in the loop's thread)."""
    if not future.done():
        future.set_result(result) if error is None else future.set_exception(error)


def in_thread(loop, fn) -> asyncio.Future:
    """`fn()` in a daemon thread: a stop signal need not wait for a store that never answers."""
    future = loop.create_future()

    def run() -> None:
        try:
            loop.call_soon_threadsafe(settle, future, fn())
        except Exception as e:
            loop.call_soon_threadsafe(settle, future, None, e)

    threading.Thread(target=run, name="find-node0", daemon=True).start()
    return future
