"""The Files and Batches API through the official `openai` client against one launched server: files
up and down (413 past --max-file-bytes), every bad line refused naming it, a 200-line batch equal
to the same requests made live while its counts move, a line the API refuses in the error file,
listing in pages, a live request served promptly while a large batch runs, which is then cancelled
with its partial output kept, and the README's batch example."""

from __future__ import annotations

import contextlib
import io
import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import requests

from tests.helpers import TINY_NAME, Server
from toka.batches import flow

MAX_FILE = 512 * 1024
MAX_SEQS = 32
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def server(tiny_models, data_dir):
    server = Server("--model", tiny_models["tiny-llama"], "--served-model-name", TINY_NAME, "--data-dir", str(data_dir),
                    "--max-file-bytes", str(MAX_FILE), "--max-seqs", str(MAX_SEQS), "--kv-cache-tokens", "8192",
                    "--max-tokens-per-forward", "256")
    yield server
    assert server.stop() == 0, server.output()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


def jsonl(lines: list) -> bytes:
    return b"".join((x if isinstance(x, bytes) else json.dumps(x).encode()) + b"\n" for x in lines)


def line(custom_id: str, body: dict, url: str = CHAT) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def chat(i: int, max_tokens: int = 24, **kw) -> dict:
    return {"model": TINY_NAME, "messages": [{"role": "user", "content": f"question {i}: {'why ' * (i % 7)}"}],
            "max_tokens": max_tokens, "temperature": 0, **kw}


def live(client, body: dict):
    """The same body made as a live request through the client (vLLM's fields in extra_body)."""
    known = {k: v for k, v in body.items() if k != "ignore_eos"}
    return client.chat.completions.create(**known, extra_body={"ignore_eos": body.get("ignore_eos", False)})


def submit(client, lines: list, endpoint: str = CHAT, **kw):
    f = client.files.create(file=("requests.jsonl", jsonl(lines)), purpose="batch")
    return client.batches.create(input_file_id=f.id, endpoint=endpoint, completion_window="24h", **kw)


def wait(client, batch_id: str, timeout: float = 120, until=("completed", "failed", "cancelled")):
    deadline = time.monotonic() + timeout
    while (b := client.batches.retrieve(batch_id)).status not in until:
        assert time.monotonic() < deadline, b
        time.sleep(0.05)
    return b


def results(client, file_id: str | None) -> list[dict]:
    return [json.loads(x) for x in client.files.content(file_id).text.splitlines()] if file_id else []


def test_files_upload_list_get_content_and_delete(client, server, data_dir):
    data = jsonl([line("a", chat(0)), line("b", chat(1))])
    f = client.files.create(file=("requests.jsonl", data), purpose="batch")
    assert (f.bytes, f.filename, f.purpose, f.status, f.object) == (len(data), "requests.jsonl", "batch", "processed",
                                                                    "file")
    assert client.files.retrieve(f.id) == f
    assert client.files.content(f.id).content == data
    assert f.id in [x.id for x in client.files.list(purpose="batch")]
    assert client.files.delete(f.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(f.id)
    with pytest.raises(openai.NotFoundError):
        client.files.content(f.id)
    assert f.id not in [x.id for x in client.files.list()]
    # only batch input is taken, as a form
    refused = requests.post(server.url + "/v1/files", files={"file": ("x.jsonl", data)}, data={"purpose": "fine-tune"})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "purpose"
    refused = requests.post(server.url + "/v1/files", json={"purpose": "batch"})
    assert refused.status_code == 400 and "multipart/form-data" in refused.json()["error"]["message"]
    # past --max-file-bytes: 413 in the API's format, nothing kept
    before = sorted(p.name for p in (data_dir / "files").iterdir())
    big = requests.post(server.url + "/v1/files", files={"file": ("big.jsonl", b"x" * (MAX_FILE + 1))},
                        data={"purpose": "batch"})
    assert big.status_code == 413 and str(MAX_FILE) in big.json()["error"]["message"], big.text
    assert sorted(p.name for p in (data_dir / "files").iterdir()) == before
    with pytest.raises(openai.APIStatusError) as e:
        client.files.create(file=("big.jsonl", b"x" * (MAX_FILE + 1)), purpose="batch")
    assert e.value.status_code == 413


GOOD = line("ok", chat(0))


@pytest.mark.parametrize("bad, says", [
    (b'{"custom_id": "x", "method": "POST", "url": "/v1/chat/completions", "body": {', "is not JSON"),
    ({k: v for k, v in GOOD.items() if k != "custom_id"}, "lacks custom_id"),
    ({k: v for k, v in GOOD.items() if k != "method"}, "lacks method"),
    ({k: v for k, v in GOOD.items() if k != "url"}, "lacks url"),
    ({k: v for k, v in GOOD.items() if k != "body"}, "lacks body"),
    ({**GOOD, "custom_id": "x", "url": "/v1/completions"}, "url '/v1/completions' is not /v1/chat/completions"),
    ({**GOOD, "custom_id": "first"}, "repeats the custom_id 'first' of line 1"),
], ids=["not-json", "no-custom_id", "no-method", "no-url", "no-body", "other-endpoint", "repeated-custom_id"])
def test_a_bad_line_refuses_the_batch_naming_its_line(client, bad, says):
    with pytest.raises(openai.BadRequestError) as e:
        submit(client, [line("first", chat(1)), line("second", chat(2)), bad])
    error = e.value.body
    assert error["param"] == "input_file_id" and error["code"] == "invalid_batch_line"
    assert "line 3: " + says in error["message"], error


def test_a_bad_batch_request_is_refused_naming_the_field(client):
    f = client.files.create(file=("r.jsonl", jsonl([GOOD])), purpose="batch")
    for kw, param in (({"endpoint": "/v1/embeddings"}, "endpoint"), ({"completion_window": "1h"}, "completion_window"),
                      ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata")):
        args = {"input_file_id": f.id, "endpoint": CHAT, "completion_window": "24h", **kw}
        with pytest.raises(openai.BadRequestError) as e:
            client.batches.create(**args)
        assert e.value.body["param"] == param, e.value.body
    with pytest.raises(openai.NotFoundError):
        client.batches.create(input_file_id="file-nope", endpoint=CHAT, completion_window="24h")
    with pytest.raises(openai.BadRequestError, match="no requests"):
        submit(client, [b"", b"  "])


def test_a_batch_equals_the_same_requests_made_live(client, server):
    bodies = [chat(i, max_tokens=32, ignore_eos=i % 3 == 0) for i in range(200)]
    too_long = chat(0, max_tokens=10**6)  # past the context window: the API refuses it
    lines = [line(f"q{i}", b) for i, b in enumerate(bodies)]
    lines.insert(57, line("too-long", too_long))
    batch = submit(client, lines, metadata={"job": "e2e"})
    assert batch.status == "validating" and batch.request_counts.total == 201 and batch.metadata == {"job": "e2e"}
    seen = []
    while (b := client.batches.retrieve(batch.id)).status != "completed":
        assert b.status in ("validating", "in_progress", "finalizing"), b
        seen.append(b.request_counts.completed + b.request_counts.failed)
        time.sleep(0.02)
    assert seen == sorted(seen) and any(0 < n < 201 for n in seen), seen  # current while it runs
    assert (b.request_counts.total, b.request_counts.completed, b.request_counts.failed) == (201, 200, 1)
    assert b.created_at <= b.in_progress_at <= b.finalizing_at <= b.completed_at and b.output_file_id
    out = {r["custom_id"]: r for r in results(client, b.output_file_id)}
    assert sorted(out) == sorted(f"q{i}" for i in range(200))
    with ThreadPoolExecutor(16) as pool:
        made = list(pool.map(lambda body: live(client, body), bodies))
    for i, want in enumerate(made):
        r = out[f"q{i}"]
        assert r["id"].startswith("batch_req_") and r["error"] is None
        got = r["response"]
        assert got["status_code"] == 200 and got["request_id"] == got["body"]["id"]
        assert got["body"]["choices"][0]["message"]["content"] == want.choices[0].message.content, i
        assert got["body"]["usage"]["completion_tokens"] == want.usage.completion_tokens
    assert b.usage.output_tokens == sum(w.usage.completion_tokens for w in made)
    [error] = results(client, b.error_file_id)
    refused = requests.post(server.url + CHAT, json=too_long)
    assert error["custom_id"] == "too-long" and error["response"]["status_code"] == refused.status_code == 400
    assert error["response"]["body"] == refused.json()
    with pytest.raises(openai.ConflictError):  # a finished batch's files stay until it is gone
        client.batches.cancel(b.id)


def test_batches_list_newest_first_in_pages(client):
    made = [submit(client, [line(f"p{i}", chat(i, max_tokens=2))]).id for i in range(3)]
    first = client.batches.list(limit=2)
    assert [x.id for x in first.data] == made[:0:-1] and first.has_more
    rest = client.batches.list(limit=2, after=first.data[-1].id)
    assert rest.data[0].id == made[0]
    everything = [x.id for x in client.batches.list(limit=1)]  # the client follows the pages
    assert everything[:3] == made[::-1] and len(everything) == len(set(everything))
    with pytest.raises(openai.BadRequestError):
        client.batches.list(limit=101)
    for batch_id in made:
        wait(client, batch_id)


def test_live_requests_go_first_and_cancel_keeps_the_partial_output(client, server):
    bodies = [chat(i, max_tokens=64, ignore_eos=True) for i in range(1000)]
    batch = submit(client, [line(f"big{i}", b) for i, b in enumerate(bodies)])
    deadline = time.monotonic() + 60
    while client.batches.retrieve(batch.id).request_counts.completed < 2 * MAX_SEQS:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    waiting = []
    for _ in range(5):  # batch lines never pile up in the scheduler's queue
        m = dict(x.rsplit(" ", 1) for x in requests.get(server.url + "/metrics").text.splitlines() if x[:1] != "#")
        waiting.append(float(m["toka_waiting"]))
        time.sleep(0.1)
    assert max(waiting) <= flow.headroom(MAX_SEQS) + 1, waiting
    t0 = time.monotonic()
    reply = live(client, chat(5000, max_tokens=16, ignore_eos=True))
    took = time.monotonic() - t0
    during = client.batches.retrieve(batch.id)
    assert reply.usage.completion_tokens == 16 and during.status == "in_progress"
    # queued behind at most the headroom: a few steps, not the thousand lines still to run
    left = during.request_counts.total - during.request_counts.completed
    assert took < 10 and left > 2 * MAX_SEQS, (took, during.request_counts)
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status == "cancelling" and cancelling.cancelling_at
    done = wait(client, batch.id, 30)
    assert done.status == "cancelled" and done.cancelled_at and done.completed_at is None
    assert 2 * MAX_SEQS <= done.request_counts.completed < 1000 and done.request_counts.failed == 0
    out = results(client, done.output_file_id)
    ids = [r["custom_id"] for r in out]
    assert len(ids) == len(set(ids)) == done.request_counts.completed
    assert all(r["response"]["body"]["usage"]["completion_tokens"] == 64 for r in out)
    deadline = time.monotonic() + 10  # nothing of it still runs
    while requests.get(server.url + "/metrics").text.count("\ntoka_http_streams 0\n") == 0:
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_the_readme_batch_example_runs(server, tmp_path, monkeypatch):
    """The README's Python batch block, as written, from upload to results."""
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    [code] = [c for c in re.findall(r"```python\n(.*?)```", readme, re.S) if "batches.create" in c]
    assert "http://localhost:10210/v1" in code
    monkeypatch.chdir(tmp_path)  # it writes requests.jsonl where it runs
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code.replace("http://localhost:10210/v1", server.url + "/v1"), "README.md", "exec"), {})
    answers = [x.split(" ", 1)[0] for x in printed.getvalue().splitlines()]
    assert "q0" in answers and "q1" in answers, printed.getvalue()
