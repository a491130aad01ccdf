"""An engine across hosts without starting one: the flags and their errors, where each rank runs,
the keys, CURVE on the fabric (the right key gets through, any other gets nothing) and what node 0
refuses at a node's Join."""

from __future__ import annotations

import logging
import os
import threading
import time

import msgspec
import pytest
import zmq

from toka import cluster, protocol
from toka.config import ConfigError, EngineConfig
from toka.fabric import Channel, Fanout, curve_keys
from toka.nodes import Leader

KEY = b"0123456789abcdef0123456789abcdef"


@pytest.fixture
def two_cores(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)


def nodes(model: str, **kw) -> EngineConfig:
    """--nnodes 2, a replica a node unless `kw` says otherwise."""
    return EngineConfig(**{"model": model, "device": "cpu", "nnodes": 2, "dp": 2, "dist_init_addr": "127.0.0.1:29500",
                           **kw})


@pytest.mark.parametrize("kw,message", [
    (dict(node_rank=2), "--node-rank 2 is not below --nnodes 2"),
    (dict(node_rank=-1), "--node-rank must not be negative"),
    (dict(dist_init_addr=None), r"--nnodes 2 needs --dist-init-addr HOST:PORT"),
    (dict(dist_init_addr="127.0.0.1"), "--dist-init-addr 127.0.0.1 is not HOST:PORT"),
    (dict(dist_init_addr="127.0.0.1:70000"), "--dist-init-addr 127.0.0.1:70000 is not HOST:PORT"),
    (dict(cluster_key_file="/no/such/key"), "--cluster-key-file /no/such/key cannot be read"),
    (dict(tp=3, dp=1), r"--tp 3 is 3 ranks, which --nnodes 2 cannot share evenly"),
    (dict(dp=3, tp=2, nnodes=2), r"puts 3 ranks on each of --nnodes 2: a --tp 2 group would span two nodes"),
    (dict(node_addr="203.0.113.7", node_rank=1), "--node-addr 203.0.113.7 is not an address of this host"),
    (dict(dist_init_addr="203.0.113.7:29500"), r"--dist-init-addr 203.0.113.7 is not an address of this host \(node 0\)"),
])
def test_bad_node_flags_name_the_flag(tiny_models, two_cores, monkeypatch, kw, message):
    monkeypatch.setenv("TOKA_CLUSTER_KEY", KEY.decode())
    with pytest.raises(ConfigError, match=message):
        nodes(tiny_models["tiny-llama"], **kw).resolve()


def test_the_cluster_key_comes_from_a_file_or_the_environment(tiny_models, tmp_path, monkeypatch):
    monkeypatch.delenv("TOKA_CLUSTER_KEY", raising=False)
    model = tiny_models["tiny-llama"]
    with pytest.raises(ConfigError, match=r"needs the secret the nodes share: --cluster-key-file FILE or \$TOKA"):
        nodes(model).resolve()
    (tmp_path / "short").write_text("secret\n")
    with pytest.raises(ConfigError, match="is 6 bytes: it needs at least 16"):
        nodes(model, cluster_key_file=str(tmp_path / "short")).resolve()
    (tmp_path / "key").write_text(KEY.decode() + "\n")
    cfg = nodes(model, cluster_key_file=str(tmp_path / "key")).resolve()
    assert cfg.cluster_key == KEY and KEY.decode() not in repr(cfg)
    monkeypatch.setenv("TOKA_CLUSTER_KEY", f"  {KEY.decode()}  ")
    assert nodes(model).resolve().cluster_key == KEY


def test_node_addresses(tiny_models, monkeypatch):
    monkeypatch.setenv("TOKA_CLUSTER_KEY", KEY.decode())
    model = tiny_models["tiny-llama"]
    assert nodes(model).resolve().node_addr == "127.0.0.1"  # node 0: --dist-init-addr's host
    assert nodes(model, node_rank=1).resolve().node_addr == "127.0.0.1"  # the address that routes to it
    assert nodes(model, node_rank=1, node_addr="127.0.0.2").resolve().node_addr == "127.0.0.2"
    assert cluster.interface_of("127.0.0.2") == "lo"


def test_ranks_fill_the_nodes_in_order():
    cfg = EngineConfig(nnodes=2, dp=2, tp=2)
    where = [(rc.replica, r, node, rc.gpu(r), name) for rc, r, node, name in cluster.placement(cfg)]
    assert where == [(0, 0, 0, 0, "replica0.rank0"), (0, 1, 0, 1, "replica0.rank1"),
                     (1, 0, 1, 0, "replica1.rank0"), (1, 1, 1, 1, "replica1.rank1")]
    assert not cluster.spans_nodes(cfg.for_replica(1))
    # a --tp 4 group larger than a node's two ranks spans two whole nodes; its stages' groups too
    cfg = EngineConfig(nnodes=4, pp=2, tp=4)
    assert [cfg.node_of(r) for r in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [cfg.gpu(r) for r in range(8)] == [0, 1] * 4 and cluster.spans_nodes(cfg)
    assert cfg.reporting_rank == 4 and cfg.node_of(cfg.reporting_rank) == 2
    # on one host nothing moves
    cfg = EngineConfig(dp=2, tp=2)
    assert [cfg.for_replica(1).gpu(r) for r in range(2)] == [2, 3] and cfg.ranks_per_node == 4


def test_cpu_cores_count_for_this_node_only(tiny_models, monkeypatch):
    monkeypatch.setenv("TOKA_CLUSTER_KEY", KEY.decode())
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    model = tiny_models["tiny-llama"]
    assert nodes(model, dp=2).resolve().ranks_per_node == 1  # a replica a node: one core each
    with pytest.raises(ConfigError, match="--dp 4 x --tp 1 on cpu needs 2 CPU cores on node 0 but 1 are available"):
        nodes(model, dp=4).resolve()


def test_curve_keys_derive_from_the_secret():
    keys, again, other = curve_keys(KEY), curve_keys(bytes(KEY)), curve_keys(KEY[::-1])
    assert keys == again and keys != other
    assert keys["server"] != keys["client"]
    for public, secret in keys.values():
        assert zmq.curve_public(secret) == public and len(public) == 40


def receive(channel: Channel, timeout: float = 1.0):
    return channel.recv() if channel.poll(int(timeout * 1000)) else None


def test_the_fabric_between_hosts_admits_only_the_cluster_key(caplog):
    """A PULL bound on tcp (as a rank binds its plans) gets what a holder of the key sends; one with
    another key is refused at the handshake, both sides log it, and nothing it sent arrives."""
    ctx = zmq.Context()
    caplog.set_level(logging.ERROR, logger="toka.fabric")
    try:
        pull = Channel(ctx, zmq.PULL, "tcp://127.0.0.1:0", protocol.RequestMsg, bind=True, key=KEY)
        assert pull.endpoint.startswith("tcp://127.0.0.1:") and not pull.endpoint.endswith(":0")
        stranger = Channel(ctx, zmq.PUSH, pull.endpoint, None, bind=False, key=KEY[::-1])
        stranger.send(protocol.Abort(13))
        assert receive(pull) is None
        friend = Channel(ctx, zmq.PUSH, pull.endpoint, None, bind=False, key=KEY)
        friend.send(protocol.Abort(7))
        assert receive(pull, 5) == protocol.Abort(7)
        assert receive(pull) is None  # and never the stranger's
        deadline = time.monotonic() + 5
        while "refused our CURVE handshake" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
        assert f"refused a connection at {pull.endpoint}: the peer does not hold this cluster's key" in caplog.text
        assert f"{pull.endpoint} refused our CURVE handshake" in caplog.text
        with pytest.raises(ValueError, match="a tcp socket needs the cluster key"):
            Channel(ctx, zmq.PUSH, pull.endpoint, None, bind=False)
    finally:
        ctx.destroy(linger=0)


def test_a_subscriber_without_the_key_is_never_counted_in_and_reads_nothing(tmp_path):
    """Plans to one rank over ipc and one over tcp: the handshake counts both; a tcp subscriber with
    another key is not counted and gets no plan."""
    ctx = zmq.Context()
    try:
        ranks = [Channel(ctx, zmq.SUB, "tcp://127.0.0.1:0", protocol.PlanMsg, bind=True, key=k) for k in (KEY, KEY[::-1])]
        local = Channel(ctx, zmq.XPUB, f"ipc://{tmp_path}/plans", None, bind=True)
        remote = Channel(ctx, zmq.XPUB, [r.endpoint for r in ranks], None, bind=False, key=KEY)
        here = Channel(ctx, zmq.SUB, f"ipc://{tmp_path}/plans", protocol.PlanMsg, bind=False)
        plans = Fanout([local, remote])
        handshake = threading.Event()

        def read_as_ranks_do() -> None:  # a bound SUB subscribes once its owner polls it (as serve() does)
            while not handshake.is_set():
                for r in ranks:
                    r.poll(20)

        reader = threading.Thread(target=read_as_ranks_do)
        reader.start()
        try:
            plans.wait_subscribers(2, timeout=10, name="plans")
            with pytest.raises(TimeoutError, match="plans: 0 of 1 subscribers joined"):
                plans.wait_subscribers(1, timeout=1, name="plans")
        finally:
            handshake.set()
            reader.join()
        plans.send(protocol.Stop(0))
        assert receive(here, 5) == protocol.Stop(0) and receive(ranks[0], 5) == protocol.Stop(0)
        assert receive(ranks[1]) is None
    finally:
        ctx.destroy(linger=0)


def test_node_0_refuses_a_join_that_does_not_fit(tiny_models, monkeypatch):
    monkeypatch.setenv("TOKA_CLUSTER_KEY", KEY.decode())
    cfg = nodes(tiny_models["tiny-llama"], dp=2).resolve()
    leader = Leader(cfg)
    assert leader.hosted == {1: {"replica1.rank0": 1}} and leader.replicas_on("node 1") == [1]
    flags = cluster.shared_flags(cfg)
    assert leader._refusal(protocol.Join(1, "10.0.0.2", flags)) is None
    assert leader._refusal(protocol.Join(2, "10.0.0.3", flags)) == \
        "--node-rank 2 is not among nodes 1-1 of --nnodes 2"
    assert leader._refusal(protocol.Join(1, "10.0.0.2", {**flags, "tp": "2"})) == \
        "it was started with --tp 2, node 0 with --tp 1"
    leader.joined[1] = b"peer"
    assert leader._refusal(protocol.Join(1, "10.0.0.2", flags)) == "node 1 has joined already"


def test_link_messages_travel_typed():
    node, leader = protocol.decoder(protocol.NodeMsg), protocol.decoder(protocol.LeaderMsg)
    for msg in (protocol.Join(1, "10.0.0.2", {"tp": "2"}), protocol.Heartbeat(1),
                protocol.Ready("rank1", {"kv_pages": 3}, {"plans": "tcp://10.0.0.2:4000"}), protocol.Fatal("rank1", "x")):
        assert node.decode(protocol.encode(msg)) == msg
    for msg in (protocol.Welcome(), protocol.Refuse("no"), protocol.Heartbeat(0), protocol.StopReplica(1),
                protocol.Shutdown(0)):
        assert leader.decode(protocol.encode(msg)) == msg
    with pytest.raises(msgspec.ValidationError):  # a plan is no link message
        node.decode(protocol.encode(protocol.Stop(0)))
