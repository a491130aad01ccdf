"""The durable store (toka/batches/store.py): a batch is created with all its lines or not at all,
results commit with the files' lengths, bytes a crash left past a committed length never show and
are cut off by the next append, pages of files and batches, the files an unfinished batch uses, one
process at a time."""

from __future__ import annotations

import io
import json
import os
import sqlite3

import pytest

from toka.batches import lines
from toka.batches.store import COMPLETED, DB_NAME, FAILED, PENDING, Result, Store, StoreBusy


def upload(store: Store, data: bytes, purpose: str = "batch") -> dict:
    path = store.upload_path()
    path.write_bytes(data)
    return store.add_file(path, purpose, "in.jsonl")


def requests(n: int) -> bytes:
    return b"".join(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
                                "body": {"prompt": "x"}}).encode() + b"\n" for i in range(n))


def create(store: Store, data: bytes) -> dict:
    f = upload(store, data)
    index = ((n, o, length) for n, o, length, _ in lines.scan(io.BytesIO(data), ("/v1/completions",)))
    return store.create_batch("/v1/completions", f["id"], "24h", {"k": "v"}, index)


def states(store: Store, batch: dict) -> list[int]:
    return [r[0] for r in store.db.execute("SELECT state FROM lines WHERE batch = ? ORDER BY line", (batch["seq"],))]


def test_files_are_kept_listed_in_pages_and_deleted(tmp_path):
    store = Store(tmp_path)
    (store.files_dir / ".upload-left-by-a-crash").write_bytes(b"x")
    with pytest.raises(StoreBusy, match=f"pid {os.getpid()}"):  # one process at a time runs a folder's batches
        Store(tmp_path)
    store.close()
    store = Store(tmp_path)  # opening again removes what an interrupted upload left
    assert list(store.files_dir.iterdir()) == []
    made = [upload(store, f"file {i}".encode()) for i in range(5)]
    assert store.file(made[0]["id"])["bytes"] == len(b"file 0")
    assert store.path(made[0]["id"]).read_bytes() == b"file 0"
    newest, more = store.files(None, None, 2, True)
    assert [f["id"] for f in newest] == [made[4]["id"], made[3]["id"]] and more
    rest, more = store.files(None, newest[-1]["id"], 10, True)
    assert [f["id"] for f in rest] == [f["id"] for f in reversed(made[:3])] and not more
    oldest, _ = store.files("batch", None, 2, False)
    assert [f["id"] for f in oldest] == [made[0]["id"], made[1]["id"]]
    assert store.files("batch_output", None, 10, True) == ([], False)
    store.delete_file(made[0]["id"])
    assert store.file(made[0]["id"]) is None and not store.path(made[0]["id"]).exists()


def test_a_bad_line_leaves_no_batch(tmp_path):
    store = Store(tmp_path)
    data = requests(3) + b'{"custom_id": "r0", "method": "POST", "url": "/v1/completions", "body": {}}\n'
    with pytest.raises(lines.LineError, match="line 4: repeats the custom_id 'r0' of line 1"):
        create(store, data)
    assert store.batches(None, 10) == ([], False)
    assert store.db.execute("SELECT COUNT(*) FROM lines").fetchone()[0] == 0


def test_results_commit_with_the_file_length_and_a_crash_tail_is_cut(tmp_path):
    store = Store(tmp_path)
    batch = create(store, requests(5))
    assert batch["status"] == "validating" and batch["total"] == 5 and json.loads(batch["metadata"]) == {"k": "v"}
    assert [p[0] for p in store.pending(batch["seq"], 0, 3)] == [1, 2, 3]
    assert [p[0] for p in store.pending(batch["seq"], 3, 3)] == [4, 5]
    ok = [lines.result(f"r{i}", 200, {"id": f"cmpl-{i}"}) for i in range(5)]
    store.record([Result(batch["seq"], 1, True, ok[0], 3, 1, 7), Result(batch["seq"], 3, False, ok[2])])
    row = store.batch(batch["id"])
    assert (row["completed"], row["failed"], row["input_tokens"], row["cached_tokens"], row["output_tokens"]) == \
        (1, 1, 3, 1, 7)
    assert states(store, batch) == [COMPLETED, PENDING, FAILED, PENDING, PENDING]
    assert [p[0] for p in store.pending(batch["seq"], 0, 10)] == [2, 4, 5]
    output, errors = store.file(row["output_file_id"]), store.file(row["error_file_id"])
    assert output["purpose"] == errors["purpose"] == "batch_output"
    assert output["filename"] == f"{batch['id']}_output.jsonl"
    assert store.path(output["id"]).read_bytes() == ok[0] and output["bytes"] == len(ok[0])
    assert store.path(errors["id"]).read_bytes() == ok[2]
    # a crash after a result reached the file but before its commit: the bytes are past the length
    with open(store.path(output["id"]), "ab") as f:
        f.write(ok[1][:30])
    store.record([Result(batch["seq"], 2, True, ok[1])])
    assert store.path(output["id"]).read_bytes() == ok[0] + ok[1]
    assert store.file(output["id"])["bytes"] == len(ok[0] + ok[1])
    with open(store.path(output["id"]), "ab") as f:
        f.write(b"half a line")
    store.seal(batch["id"])  # a finished batch's files hold exactly what was committed
    assert store.path(output["id"]).read_bytes() == ok[0] + ok[1]


def test_statuses_are_stamped_once_and_unfinished_batches_listed_in_arrival_order(tmp_path):
    store = Store(tmp_path)
    a, b, c = (create(store, requests(2)) for _ in range(3))
    assert store.users(a["input_file_id"]) == [{"id": a["id"], "status": "validating"}]
    first = store.set_status(a["id"], "in_progress")["in_progress_at"]
    assert store.set_status(a["id"], "in_progress")["in_progress_at"] == first
    store.set_status(b["id"], "cancelled")
    failed = store.set_status(c["id"], "failed", [{"code": "x", "message": "y", "param": None, "line": None}])
    assert failed["status"] == "failed" and json.loads(failed["errors"])[0]["code"] == "x"
    assert [r["id"] for r in store.unfinished()] == [a["id"]]
    assert store.users(b["input_file_id"]) == []
    page, more = store.batches(None, 2)
    assert [r["id"] for r in page] == [c["id"], b["id"]] and more
    assert [r["id"] for r in store.batches(b["id"], 2)[0]] == [a["id"]]
    store.close()
    with sqlite3.connect(tmp_path / DB_NAME) as db:  # what a new process finds
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("SELECT status FROM batches ORDER BY seq").fetchall() == \
            [("in_progress",), ("cancelled",), ("failed",)]
