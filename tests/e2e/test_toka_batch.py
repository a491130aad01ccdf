"""toka-batch: a JSONL file of both endpoints' requests run through a toka-launch of its own, killed
mid-way (SIGKILL: its toka-launch stops too) and run again with the same -o, which skips the lines
already there; the output holds every custom_id once, successes and the API's errors, and stderr the
progress. A bad input line stops it before anything starts."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time

from tests.helpers import TINY_NAME

LINES = 240
FLAGS = ("--max-tokens-per-forward", "128", "--kv-cache-tokens", "4096", "--max-seqs", "32")


def request(i: int) -> dict:
    if i % 2:
        url, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": f"say {i}"}]}
    else:
        url, body = "/v1/completions", {"prompt": f"count to {i}"}
    body.update(model=TINY_NAME, max_tokens=32, temperature=0, ignore_eos=True)
    if i == 101:
        body["max_tokens"] = 10**6  # past the context window: the API refuses it
    return {"custom_id": f"id-{i}", "method": "POST", "url": url, "body": body}


def toka_batch(model: str, src, out, stderr) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "toka.batches.cli", "-i", str(src), "-o", str(out), "--model", model,
                             "--served-model-name", TINY_NAME, *FLAGS], stderr=stderr, stdout=subprocess.DEVNULL)


def complete_lines(path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_toka_batch_runs_a_file_and_resumes_after_a_kill(tiny_models, tmp_path):
    model = tiny_models["tiny-llama"]
    src, out = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    src.write_text("".join(json.dumps(request(i)) + "\n" for i in range(LINES)))

    with open(tmp_path / "first.err", "w+") as err:
        first = toka_batch(model, src, out, err)
        deadline = time.monotonic() + 120
        while complete_lines(out) < 40:
            assert first.poll() is None and time.monotonic() < deadline, (tmp_path / "first.err").read_text()
            time.sleep(0.02)
        first.send_signal(signal.SIGKILL)
        first.wait()
        err.seek(0)
        launcher = int(re.search(r"pid (\d+)", err.read())[1])
    deadline = time.monotonic() + 40  # toka-launch gets SIGTERM when toka-batch dies, and drains
    while not gone(launcher):
        assert time.monotonic() < deadline, "toka-launch outlived toka-batch"
        time.sleep(0.1)
    kept = out.read_bytes()
    done = kept.count(b"\n")
    assert 40 <= done < LINES

    second = subprocess.run([sys.executable, "-m", "toka.batches.cli", "-i", str(src), "-o", str(out), "--model", model,
                             "--served-model-name", TINY_NAME, *FLAGS], capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    assert f"{done} of {LINES} lines are in {out} already; running the other {LINES - done}" in second.stderr
    assert f"{LINES}/{LINES} lines (1 error)" in second.stderr and "tok/s" in second.stderr, second.stderr
    assert f"{LINES - done} lines run in" in second.stderr, second.stderr

    data = out.read_bytes()
    assert data.startswith(kept[: kept.rfind(b"\n") + 1])  # what the first run wrote stays as it was
    results = [json.loads(x) for x in data.splitlines()]
    assert sorted(r["custom_id"] for r in results) == sorted(f"id-{i}" for i in range(LINES))
    by_id = {r["custom_id"]: r["response"] for r in results}
    refused = by_id.pop("id-101")
    assert refused["status_code"] == 400 and refused["body"]["error"]["param"] == "max_tokens"
    assert all(r["status_code"] == 200 and r["body"]["usage"]["completion_tokens"] == 32 for r in by_id.values())
    assert {r["body"]["object"] for r in by_id.values()} == {"text_completion", "chat.completion"}

    again = subprocess.run([sys.executable, "-m", "toka.batches.cli", "-i", str(src), "-o", str(out)],
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "running the other 0" in again.stderr and out.read_bytes() == data


def test_a_bad_input_line_stops_toka_batch_before_it_starts(tmp_path):
    src = tmp_path / "requests.jsonl"
    src.write_text(json.dumps(request(0)) + "\n" + json.dumps({**request(1), "custom_id": "id-0"}) + "\n")
    run = subprocess.run([sys.executable, "-m", "toka.batches.cli", "-i", str(src), "-o", str(tmp_path / "out.jsonl")],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "line 2: repeats the custom_id 'id-0' of line 1" in run.stderr, run.stderr
    assert not (tmp_path / "out.jsonl").exists() and "toka-launch" not in run.stderr
