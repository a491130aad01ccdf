"""An engine across hosts (--nnodes): where each rank runs, how the nodes find each other, and which
sockets cross between them.

Every node runs the same command but its --node-rank. The replicas' ranks, in order (replica k's rank
r is rank k * pp * tp + r of the whole engine), fill the nodes in order, --dp x --pp x --tp / --nnodes
a node, on its GPUs 0, 1, ... Node 0 runs the HTTP server, every scheduler and its own ranks; the
others run only ranks, started by their toka-launch (toka/nodes.py).

Inside a node the sockets are ipc, as on one host. A rank on another node than the scheduler binds
its plans (SUB) and, if it reports, its token events (XPUB) on tcp at that node's address, port 0,
with CURVE; it reports the endpoints in its READY, and node 0 connects the scheduler and the server to
them. So the sockets of node 0 never listen on tcp except the link to the other nodes, and nothing
listens on all interfaces.

torch.distributed groups of a replica inside one node meet at a file in the launch's folder, as on
one host; a replica that spans nodes meets at node 0's TCPStore at --dist-init-addr (a key prefix
per replica), where the other nodes also find node 0's link endpoint.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
from datetime import timedelta

import zmq

from toka import protocol
from toka.config import ConfigError, EngineConfig
from toka.fabric import Channel, Fanout

STORE_TIMEOUT = timedelta(seconds=1800)  # as long as start-up may take: a node may start long before node 0
LINK_KEY = "toka/link"  # the TCPStore key of node 0's link endpoint
MIN_KEY_BYTES = 16
# flags whose values every node must share: they decide what each rank computes and how the
# scheduler plans for it. The others (addresses, files, logging) may differ from node to node.
SHARED_FLAGS = ("nnodes", "dp", "pp", "tp", "device", "dtype", "kv_cache_dtype", "quantization", "load_format", "seed",
                "page_size", "max_seqs", "max_tokens_per_forward", "max_model_len", "steps_ahead", "cuda_graphs", "piecewise_graphs",
                "cuda_graph_max_batch", "decode_attention", "logprobs_mode", "prefix_caching", "hydragen")


# ---- flags -------------------------------------------------------------------------------------------
def split_address(value: str) -> tuple[str, int]:
    """HOST:PORT of --dist-init-addr (an IPv6 host in brackets) as (host, port)."""
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--dist-init-addr {value} is not HOST:PORT with a port in 1-65535")
    return host, int(port)


def read_key(path: str | None) -> bytes:
    """The cluster secret: the contents of --cluster-key-file, else $TOKA_CLUSTER_KEY (white space
    around it ignored, so `openssl rand -hex 32 > FILE` makes one)."""
    if path is not None:
        try:
            with open(path, "rb") as f:
                key, source = f.read().strip(), f"--cluster-key-file {path}"
        except OSError as e:
            raise ConfigError(f"--cluster-key-file {path} cannot be read: {e.strerror}") from None
    elif os.environ.get("TOKA_CLUSTER_KEY"):
        key, source = os.environ["TOKA_CLUSTER_KEY"].strip().encode(), "$TOKA_CLUSTER_KEY"
    else:
        raise ConfigError("--nnodes > 1 needs the secret the nodes share: --cluster-key-file FILE or "
                          "$TOKA_CLUSTER_KEY (make one with `openssl rand -hex 32`)")
    if len(key) < MIN_KEY_BYTES:
        raise ConfigError(f"the key of {source} is {len(key)} bytes: it needs at least {MIN_KEY_BYTES} (make one "
                          "with `openssl rand -hex 32`)")
    return key


def node_address(given: str | None, node0: str, node_rank: int) -> str:
    """The IPv4 address this node's fabric binds: --node-addr, else on node 0 --dist-init-addr's host,
    else the address of this host that routes to it."""
    if given is None and node_rank > 0:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # connecting a UDP socket sends nothing
            try:
                s.connect((resolve("--dist-init-addr", node0), 9))
            except OSError as e:
                raise ConfigError(f"no route from this host to --dist-init-addr's host {node0}: {e.strerror}") from None
            return s.getsockname()[0]
    flag, name = ("--node-addr", given) if given else ("--dist-init-addr", node0)
    address = resolve(flag, name)
    with socket.socket() as s:
        try:
            s.bind((address, 0))
        except OSError as e:
            problem = "is not an address of this host" if e.errno == errno.EADDRNOTAVAIL else f"cannot bind: {e.strerror}"
            raise ConfigError(f"{flag} {name} {problem} (node {node_rank})") from None
    return address


def resolve(flag: str, name: str) -> str:
    try:
        return socket.gethostbyname(name)
    except OSError as e:
        raise ConfigError(f"{flag} {name} does not resolve to an IPv4 address: {e}") from None


def interface_of(address: str) -> str | None:
    """The name of the network interface whose IPv4 network holds `address` (Linux), or None."""
    import fcntl
    import struct

    siocgifaddr, siocgifnetmask = 0x8915, 0x891B
    for _, name in socket.if_nameindex():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            request = struct.pack("256s", name.encode()[:15])
            try:
                addr = socket.inet_ntoa(fcntl.ioctl(s.fileno(), siocgifaddr, request)[20:24])
                mask = socket.inet_ntoa(fcntl.ioctl(s.fileno(), siocgifnetmask, request)[20:24])
            except OSError:  # no IPv4 address on it
                continue
        if ipaddress.IPv4Address(address) in ipaddress.IPv4Network(f"{addr}/{mask}", strict=False):
            return name
    return None


def use_node_interface(cfg: EngineConfig) -> None:
    """gloo and NCCL's sockets pick an interface of their own (the host name's, which may not reach the
    other nodes): unless the user chose one, the interface of --node-addr. Set before ranks start."""
    name = interface_of(cfg.node_addr)
    if name is not None:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", name)
        os.environ.setdefault("NCCL_SOCKET_IFNAME", name)


def shared_flags(cfg: EngineConfig) -> dict[str, str]:
    return {name: str(getattr(cfg, name)) for name in SHARED_FLAGS}


def flag_mismatch(ours: dict[str, str], theirs: dict[str, str]) -> str | None:
    for name in SHARED_FLAGS:
        if ours.get(name) != theirs.get(name):
            flag = "--" + name.replace("_", "-")
            return f"it was started with {flag} {theirs.get(name)}, node 0 with {flag} {ours.get(name)}"
    return None


# ---- placement, torch.distributed and the sockets of ranks and schedulers ---------------------------
def placement(cfg: EngineConfig) -> list[tuple[EngineConfig, int, int, str]]:
    """Every rank of the engine: (its replica's config, rank in the replica, node, process name)."""
    out = []
    for k in range(cfg.dp):
        rc = cfg.for_replica(k)
        out += [(rc, r, rc.node_of(r), rc.process_name(f"rank{r}")) for r in range(cfg.ranks)]
    return out


def spans_nodes(cfg: EngineConfig) -> bool:
    return len({cfg.node_of(r) for r in range(cfg.ranks)}) > 1


def store(cfg: EngineConfig, master: bool = False):
    """Node 0's TCPStore at --dist-init-addr (on node 0's launcher with master=True)."""
    import torch.distributed as dist

    host, port = split_address(cfg.dist_init_addr)
    return dist.TCPStore(host, port, is_master=master, wait_for_workers=False, timeout=STORE_TIMEOUT)


def rendezvous(cfg: EngineConfig) -> dict:
    """init_process_group's arguments that make this replica's ranks meet."""
    if not spans_nodes(cfg):
        return {"init_method": f"file://{cfg.run_path('dist-init')}"}
    import torch.distributed as dist

    return {"store": dist.PrefixStore(f"toka/replica{cfg.replica}/", store(cfg))}


def rank_channels(ctx: zmq.Context, cfg: EngineConfig, rank: int) -> tuple[Channel, Channel | None, dict[str, str]]:
    """A rank's plans (SUB) and, on the reporting rank, its token events (XPUB), with the tcp
    endpoints node 0 must connect to (none on node 0, whose ranks use the replica's ipc sockets).
    A bound SUB subscribes a connecting publisher only once the rank polls or reads it (libzmq attaches
    a bound socket's connections in the socket's own thread): serve() reads plans right after the
    events handshake, which the scheduler's events connection completes before it awaits its own."""
    reports = rank == cfg.reporting_rank
    if cfg.node_rank == 0:
        plans = Channel(ctx, zmq.SUB, cfg.endpoint("plans"), protocol.PlanMsg, bind=False)
        events = Channel(ctx, zmq.XPUB, cfg.endpoint("events"), None, bind=True) if reports else None
        return plans, events, {}
    here = f"tcp://{cfg.node_addr}:0"
    plans = Channel(ctx, zmq.SUB, here, protocol.PlanMsg, bind=True, key=cfg.cluster_key)
    events = Channel(ctx, zmq.XPUB, here, None, bind=True, key=cfg.cluster_key) if reports else None
    endpoints = {"plans": plans.endpoint}
    if events is not None:
        endpoints["events"] = events.endpoint
    return plans, events, endpoints


def plan_publisher(ctx: zmq.Context, cfg: EngineConfig) -> Fanout:
    """The scheduler's plans: bound on ipc for the ranks of node 0, connected to the plans endpoint of
    each rank on another node."""
    channels = []
    if any(cfg.node_of(r) == 0 for r in range(cfg.ranks)):
        channels.append(Channel(ctx, zmq.XPUB, cfg.endpoint("plans"), None, bind=True))
    if cfg.remote_plans:
        channels.append(Channel(ctx, zmq.XPUB, cfg.remote_plans, None, bind=False, key=cfg.cluster_key))
    return Fanout(channels)
