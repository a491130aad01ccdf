"""--nnodes 2 with two "hosts" on one machine: two toka-launch processes on 127.0.0.1 (node 0, which
serves) and 127.0.0.2 (node 1), gloo between their ranks, tcp with CURVE between their sockets.
A tensor-parallel group across the two answers as one rank; a replica a node both serve through
node 0, which survives node 1's death; a node with another cluster key gets nowhere; SIGTERM on
node 0 ends both, and node 0's death ends node 1."""

from __future__ import annotations

import os
import signal
import time

import pytest
import requests

from tests.helpers import Launch, Server, free_port
from tests.reliability.conftest import SMALL, assert_same_outcomes, child_pids, metrics, mixed, settled, wait_gone


def cluster(model: str, port: int, *args: str) -> tuple[str, ...]:
    return ("--model", model, *SMALL, "--nnodes", "2", "--dist-init-addr", f"127.0.0.1:{port}", *args)


def node1(model: str, port: int, *args: str, **kw) -> Launch:
    return Launch(*cluster(model, port, "--node-rank", "1", "--node-addr", "127.0.0.2", *args), **kw)


@pytest.fixture(scope="module")
def key_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("keys") / "cluster.key"
    path.write_text(os.urandom(32).hex() + "\n")
    return str(path)


def killed(*launches: Launch) -> None:
    """Nothing left behind, whatever a test did."""
    for launch in launches:
        if launch.proc.poll() is None:
            launch.proc.kill()
            launch.proc.wait()
        for pid in wait_gone(child_pids(launch).values(), timeout=0):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def tp2(tiny_models, key_file):
    """--tp 2: rank 0 on node 0, rank 1 on node 1. Node 1 starts first (it waits for node 0) and reads
    the key from the file, node 0 from the environment."""
    port = free_port()
    second = node1(tiny_models["tiny-llama"], port, "--tp", "2", "--cluster-key-file", key_file)
    first = Server(*cluster(tiny_models["tiny-llama"], port, "--tp", "2"),
                   env={"TOKA_CLUSTER_KEY": open(key_file).read()})
    yield first, second
    killed(first, second)


def test_a_tensor_parallel_group_across_two_nodes_answers_as_one_rank(tp2, shared):
    first, second = tp2
    assert set(child_pids(first)) == {"rank0", "scheduler"} and set(child_pids(second)) == {"rank1"}
    assert "node 1 joined from 127.0.0.2" in first.output()
    assert_same_outcomes(first.url, shared.url, [mixed(i) for i in range(8)])


def test_sigterm_on_node_0_ends_both_nodes_with_exit_0(tp2):
    first, second = tp2
    pids = [*child_pids(first).values(), *child_pids(second).values()]
    first.proc.send_signal(signal.SIGTERM)
    assert first.proc.wait(timeout=60) == 0, first.output()
    assert second.proc.wait(timeout=30) == 0, second.output()
    assert wait_gone(pids) == []


@pytest.fixture(scope="module")
def dp2(tiny_models, key_file, tmp_path_factory):
    """--dp 2: replica 0 on node 0, replica 1 on node 1. While node 0 waits, a node 1 with another
    key tries to join first (`refused`); then the right one joins."""
    model, port = tiny_models["tiny-llama"], free_port()
    first = Server(*cluster(model, port, "--dp", "2", "--cluster-key-file", key_file), wait=False)
    other = tmp_path_factory.mktemp("other") / "other.key"
    other.write_text(os.urandom(32).hex())
    refused = node1(model, port, "--dp", "2", "--cluster-key-file", str(other))
    second = None
    try:
        refused.proc.wait(timeout=120)
        second = node1(model, port, "--dp", "2", "--cluster-key-file", key_file)
        first.wait_healthy()
        yield first, second, refused
        assert first.stop() == 0, first.output()
    finally:
        killed(first, refused, *([second] if second else []))


def test_a_node_with_another_key_is_refused(dp2):
    first, _, refused = dp2
    assert refused.proc.returncode == 1
    out = refused.output()
    assert "refused this node at the CURVE handshake" in out.strip().splitlines()[-1], out
    assert child_pids(refused) == {}  # it started no rank
    log = first.output()
    assert "refused a connection at tcp://127.0.0.1:" in log and "does not hold this cluster's key" in log, log
    assert log.count("node 1 joined") == 1  # the right node only


def test_a_replica_on_each_node_serves_through_node_0(dp2, shared):
    first, second, _ = dp2
    assert set(child_pids(first)) == {"replica0.rank0", "replica0.scheduler", "replica1.scheduler"}
    assert set(child_pids(second)) == {"replica1.rank0"}
    assert requests.get(first.url + "/health", timeout=5).json() == {"status": "ok", "replicas": 2}
    assert "replica 1: node 1 cpu" in first.output()
    assert_same_outcomes(first.url, shared.url, [mixed(i) for i in range(8)])
    m = settled(first.url)
    assert m['steps_total{replica="0"}'] > 0 and m['steps_total{replica="1"}'] > 0, m


def test_node_0_serves_on_when_node_1_dies(dp2):
    first, second, _ = dp2
    on_node1 = list(child_pids(second).values())
    second.proc.kill()
    assert wait_gone(on_node1) == []  # its ranks die with it
    deadline = time.monotonic() + 30  # node 0 misses its heartbeats for a few seconds
    while requests.get(first.url + "/health", timeout=5).json()["replicas"] != 1:
        assert time.monotonic() < deadline, first.output()
        time.sleep(0.2)
    assert "node 1 lost: no heartbeat" in first.output()
    assert wait_gone([child_pids(first)["replica1.scheduler"]]) == []
    resp = requests.post(first.url + "/v1/completions", json={"prompt": "still here", "max_tokens": 8}, timeout=60)
    assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 8, resp.text
    assert metrics(first.url)["replicas_live"] == 1


def test_a_node_stops_when_node_0_is_gone(tiny_models, key_file):
    """Node 0 killed outright: its children die with it, and node 1, hearing nothing for a few
    seconds, stops its rank and exits 1."""
    model, port = tiny_models["tiny-llama"], free_port()
    second = node1(model, port, "--dp", "2", "--cluster-key-file", key_file)
    first = Server(*cluster(model, port, "--dp", "2", "--cluster-key-file", key_file))
    try:
        pids = [*child_pids(first).values(), *child_pids(second).values()]
        first.proc.kill()
        assert second.proc.wait(timeout=30) == 1
        assert "node 0 lost: no heartbeat" in second.output()
        assert wait_gone(pids) == []
    finally:
        killed(first, second)
