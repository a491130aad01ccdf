"""Process life cycle: no orphans when the launcher is killed, a graceful drain on SIGTERM, and
launch failures that stop within seconds with a clear message and a non-zero exit."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.helpers import free_port
from tests.reliability.conftest import child_pids, descendants, metrics, wait_gone


def test_sigkill_of_the_launcher_leaves_no_orphans(fresh):
    import glob
    import tempfile

    from toka.fabric import PID_FILE, remove_stale_run_dirs

    server = fresh()
    family = descendants(server.proc.pid)
    pid_files = glob.glob(os.path.join(tempfile.gettempdir(), "toka-*", PID_FILE))
    run_dirs = [os.path.dirname(f) for f in pid_files if open(f).read() == str(server.proc.pid)]
    assert len(run_dirs) == 1
    pids = child_pids(server)
    assert set(pids.values()) <= set(family) and len(family) >= 3  # ranks, scheduler, resource tracker
    with ThreadPoolExecutor(1) as pool:  # mid-generation, so every child is busy
        pool.submit(requests.post, server.url + "/v1/completions",
                    json={"prompt": "x", "max_tokens": 2000, "ignore_eos": True}, timeout=30)
        time.sleep(0.3)
        server.proc.kill()
        server.proc.wait()
        assert wait_gone(family, timeout=10) == []
    assert os.path.isdir(run_dirs[0])  # nobody could clean up: the next launch does
    remove_stale_run_dirs()
    assert not os.path.exists(run_dirs[0])


def test_sigterm_drains_then_exits_0(fresh, tmp_path, monkeypatch):
    from toka.fabric import STOP_FIGURES_ENV

    monkeypatch.setenv(STOP_FIGURES_ENV, str(tmp_path))  # each process's host figures at its stop
    server = fresh("--drain-timeout", "3", "--kv-cache-tokens", "16384")  # no preemption: steady steps
    url = server.url
    short = {"prompt": "finish me", "max_tokens": 100, "ignore_eos": True, "temperature": 0}
    expected = requests.post(url + "/v1/completions", json=short).json()["choices"][0]["text"]
    long = {"prompt": "too long", "max_tokens": 2000, "ignore_eos": True, "n": 4}  # ~8 s: outlasts the drain
    family = descendants(server.proc.pid)
    def wait_streams(count):
        deadline = time.monotonic() + 30
        while metrics(url)["http_streams"] < count:
            assert time.monotonic() < deadline
            time.sleep(0.02)

    with ThreadPoolExecutor(4) as pool:
        shorts = [pool.submit(requests.post, url + "/v1/completions", json=short, timeout=60) for _ in range(3)]
        wait_streams(3)  # the short ones first: the older sequences, never preempted for the long ones
        longs = pool.submit(requests.post, url + "/v1/completions", json=long, timeout=60)
        wait_streams(7)
        t0 = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.1)
        refused = requests.post(url + "/v1/completions", json=short)
        assert refused.status_code == 503 and refused.json()["error"]["type"] == "server_error"
        assert requests.get(url + "/health").status_code == 503
        for f in shorts:  # in flight at SIGTERM: completed, and correctly
            r = f.result()
            assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected
        r = longs.result()  # still running at the drain timeout: failed cleanly
        assert r.status_code == 503 and "shut down" in r.json()["error"]["message"], r.text
        assert 3 <= time.monotonic() - t0 < 8
    assert server.proc.wait(timeout=15) == 0
    assert wait_gone(family) == []
    rank, sched = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("rank0", "scheduler"))
    assert rank["steps"] == sched["steps"] >= 100 and 0 < rank["launching_s"] < rank["span_s"]
    assert sched["planning_s"] > 0 and sched["results_s"] > 0


# ---- launch failures ----------------------------------------------------------------------------
def launch(*args: str, timeout: float = 60) -> tuple[int, str, float]:
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "toka.launch", *args], capture_output=True, text=True,
                         timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return out.returncode, out.stderr, time.monotonic() - t0


def unsupported_model(tiny_models, tmp_path) -> str:
    path = tmp_path / "gpt2-ish"
    shutil.copytree(tiny_models["tiny-llama"], path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    return str(path)


FAILURES = {
    "missing model folder": (lambda m, tmp: ["--model", str(tmp / "no" / "such-model")], "does not exist"),
    "unsupported architecture": (lambda m, tmp: ["--model", unsupported_model(m, tmp)], "'gpt2' is not supported"),
    "more ranks than cores": (lambda m, tmp: ["--model", m["tiny-llama"], "--tp", str(len(os.sched_getaffinity(0)) + 1)],
                              "CPU cores"),
    "KV cache beyond memory": (lambda m, tmp: ["--model", m["tiny-llama"], "--kv-cache-tokens", str(10**13)],
                               "lower --kv-cache-tokens"),
    "unknown decode kernel": (lambda m, tmp: ["--model", m["tiny-llama"], "--decode-attention", "fa3"],
                              "--decode-attention must be auto, triton, cuda-cores, tensor-cores, xqa"),
    "several nodes without an address": (lambda m, tmp: ["--model", m["tiny-llama"], "--nnodes", "2", "--dp", "2"],
                                         "--nnodes 2 needs --dist-init-addr HOST:PORT"),
}


@pytest.mark.parametrize("case", list(FAILURES))
def test_launch_failure_is_quick_and_clear(tiny_models, tmp_path, case):
    make_args, message = FAILURES[case]
    code, stderr, took = launch(*make_args(tiny_models, tmp_path), "--port", str(free_port()))
    assert code != 0 and message in stderr.strip().splitlines()[-1], stderr[-3000:]  # the last word
    assert took < 30


def test_port_in_use_is_quick_and_clear(tiny_models):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        code, stderr, took = launch("--model", tiny_models["tiny-llama"], "--port", str(port))
    assert code != 0 and f"port {port} on 127.0.0.1 is already in use" in stderr.strip().splitlines()[-1], stderr
    assert took < 30
