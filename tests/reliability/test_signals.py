"""Stop signals as terminals and supervisors send them: Ctrl-C sends SIGINT to the whole process
group, systemd and `docker stop` of a process tree send SIGTERM to every process. The children
leave stopping to the launcher, so either drains like SIGTERM to the launcher alone: running
requests finish, the launcher exits 0, nothing prints a traceback. A second Ctrl-C stops at once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
import requests

from tests.reliability.conftest import descendants, wait_gone

LONG = {"prompt": "x", "max_tokens": 1500, "ignore_eos": True, "stream": True,
        "stream_options": {"include_usage": True}}


class SessionPopen(subprocess.Popen):
    """A process that leads a process group of its own, as a job a shell starts: os.killpg on its
    pid then reaches the launcher and every child, as Ctrl-C in the terminal would."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, start_new_session=True, **kwargs)


@pytest.fixture
def group_leader(fresh):
    def make(*args: str):
        with pytest.MonkeyPatch.context() as m:
            m.setattr(subprocess, "Popen", SessionPopen)
            return fresh(*args)

    return make


def events(lines) -> list:
    """The SSE events of a stream as they arrive: dicts, then "[DONE]"."""
    for line in lines:
        if line.startswith(b"data: "):
            data = line.removeprefix(b"data: ")
            yield "[DONE]" if data == b"[DONE]" else json.loads(data)


def log_of(server) -> str:
    with open(server.log.name) as f:
        return f.read()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_stop_signal_to_the_process_group_drains_and_exits_0(group_leader, sig):
    server = group_leader("--drain-timeout", "120")
    family = descendants(server.proc.pid)
    with requests.post(server.url + "/v1/completions", json=LONG, stream=True, timeout=120) as r:
        stream = events(r.iter_lines())
        assert "choices" in next(stream)  # generating
        os.killpg(server.proc.pid, sig)
        time.sleep(0.3)
        assert requests.get(server.url + "/health").status_code == 503
        refused = requests.post(server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 1})
        assert refused.status_code == 503, refused.text
        rest = list(stream)
    assert rest[-1] == "[DONE]" and rest[-2]["usage"]["completion_tokens"] == LONG["max_tokens"], rest[-3:]
    assert rest[-3]["choices"][0]["finish_reason"] == "length"
    assert server.proc.wait(timeout=30) == 0, log_of(server)[-3000:]
    assert "Traceback" not in log_of(server) and "KeyboardInterrupt" not in log_of(server), log_of(server)[-3000:]
    assert wait_gone(family) == []


def test_a_second_ctrl_c_stops_at_once(group_leader):
    server = group_leader("--drain-timeout", "120")
    family = descendants(server.proc.pid)
    with requests.post(server.url + "/v1/completions", json=LONG, stream=True, timeout=120) as r:
        stream = events(r.iter_lines())
        assert "choices" in next(stream)
        os.killpg(server.proc.pid, signal.SIGINT)
        time.sleep(0.3)
        assert requests.get(server.url + "/health").status_code == 503  # draining
        t0 = time.monotonic()
        os.killpg(server.proc.pid, signal.SIGINT)
        rest = list(stream)
    assert "interrupted" in rest[-2]["error"]["message"] and rest[-1] == "[DONE]", rest[-3:]
    assert server.proc.wait(timeout=10) == 130
    assert time.monotonic() - t0 < 5
    assert "Traceback" not in log_of(server), log_of(server)[-3000:]
    assert wait_gone(family) == []
