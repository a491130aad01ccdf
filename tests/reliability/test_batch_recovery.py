"""A batch outlives its server: toka-launch killed with SIGKILL (its whole process group, as an
out-of-memory kill or a lost machine leaves it) in the middle of a batch, then started again on the
same --data-dir, resumes it. Lines the store had committed are not run again and stay as they were;
in the end every custom_id is in the output file exactly once."""

from __future__ import annotations

import functools
import json
import os
import signal
import sqlite3
import subprocess
import time

import openai
import pytest

from tests.reliability.conftest import descendants, metrics, wait_gone
from toka.batches.store import DB_NAME

LINES = 300


def client_of(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


def body(i: int) -> dict:
    return {"prompt": f"line {i} of the batch", "max_tokens": 32, "temperature": 0, "ignore_eos": True}


def test_a_batch_killed_mid_way_resumes_on_the_same_data_dir(fresh, tmp_path):
    data = tmp_path / "data"
    with pytest.MonkeyPatch.context() as m:  # its own process group, which os.killpg then reaches whole
        m.setattr(subprocess, "Popen", functools.partial(subprocess.Popen, start_new_session=True))
        first = fresh("--data-dir", str(data))
    family = [first.proc.pid, *descendants(first.proc.pid)]
    client = client_of(first)
    lines = [{"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions", "body": body(i)} for i in range(LINES)]
    f = client.files.create(file=("in.jsonl", "".join(json.dumps(x) + "\n" for x in lines).encode()), purpose="batch")
    batch = client.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h")
    deadline = time.monotonic() + 60
    while client.batches.retrieve(batch.id).request_counts.completed < 60:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.killpg(first.proc.pid, signal.SIGKILL)
    first.proc.wait()
    assert wait_gone(family) == []

    # what the store holds after the kill
    with sqlite3.connect(data / DB_NAME) as db:
        done, status, output_id = db.execute("SELECT completed, status, output_file_id FROM batches WHERE id = ?",
                                             (batch.id,)).fetchone()
        size = db.execute("SELECT bytes FROM files WHERE id = ?", (output_id,)).fetchone()[0]
    assert status == "in_progress" and 60 <= done < LINES
    kept = (data / "files" / output_id).read_bytes()[:size]
    assert kept.count(b"\n") == done

    second = fresh("--data-dir", str(data))
    client = client_of(second)
    deadline = time.monotonic() + 120
    while (b := client.batches.retrieve(batch.id)).status != "completed":
        assert b.status == "in_progress" and time.monotonic() < deadline, b
        time.sleep(0.05)
    assert (b.request_counts.completed, b.request_counts.failed, b.output_file_id) == (LINES, 0, output_id)
    output = client.files.content(output_id).content
    assert output.startswith(kept)  # the lines finished before the kill, untouched
    results = [json.loads(x) for x in output.splitlines()]
    assert sorted(r["custom_id"] for r in results) == sorted(x["custom_id"] for x in lines)  # each exactly once
    # the second server ran the lines left pending, those in flight at the kill among them, and no other
    finished = sum(v for k, v in metrics(second.url).items() if k.startswith("requests_finished_total"))
    assert finished == LINES - done, (finished, done)
    # the outputs on either side of the kill are what the same requests get live
    by_id = {r["custom_id"]: r["response"]["body"]["choices"][0]["text"] for r in results}
    model = client.models.list().data[0].id
    for i in (0, 1, LINES - 2, LINES - 1):
        live = client.completions.create(model=model, **{k: v for k, v in body(i).items() if k != "ignore_eos"},
                                         extra_body={"ignore_eos": True})
        assert live.choices[0].text == by_id[f"c{i}"]
