"""The durable store of files and batches: one SQLite database (WAL) for files, batches and the state
of every line, and the files' bodies beside it.

    DATA/toka.sqlite3            files, batches, lines
    DATA/lock                    flock of the process using the folder (its pid inside)
    DATA/files/<file id>         a file's body: uploads, and the batches' output and error files
    DATA/files/.upload-<hex>     an upload being received (left over by a crash: removed on opening)

A result is appended to its batch's output or error file, synced, and committed with the file's new
length and the line's new state in one transaction (`record`). A file's length in the database is
what it holds: bytes past it are lines whose commit never came (a crash), never served, and cut off
by the next append. So a line is in exactly one file, once, however the process ended, and a line
still pending runs again.

Connections are per thread, as sqlite3 wants; the runner makes every write from one thread of its
own, the routes read from the event loop's.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from toka.batches.lines import new_id

DB_NAME = "toka.sqlite3"
LOCK_NAME = "lock"  # held by the one process whose runner may run the folder's batches
UPLOAD_PREFIX = ".upload-"
CHUNK_LINES = 10_000  # lines inserted per statement while a batch is created

PENDING, COMPLETED, FAILED = 0, 1, 2  # a line's state
UNFINISHED = ("validating", "in_progress", "finalizing", "cancelling")

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    seq INTEGER PRIMARY KEY,            -- creation order, for listing
    id TEXT UNIQUE NOT NULL,
    purpose TEXT NOT NULL,
    filename TEXT NOT NULL,
    bytes INTEGER NOT NULL,             -- what the file holds: a batch's output grows as lines are committed
    created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS batches (
    seq INTEGER PRIMARY KEY,            -- arrival order: batches share the engine in it
    id TEXT UNIQUE NOT NULL,
    endpoint TEXT NOT NULL,
    input_file_id TEXT NOT NULL,
    completion_window TEXT NOT NULL,
    metadata TEXT,                      -- JSON
    status TEXT NOT NULL,
    output_file_id TEXT,
    error_file_id TEXT,
    errors TEXT,                        -- JSON: why a batch failed
    created_at INTEGER NOT NULL,
    in_progress_at INTEGER, finalizing_at INTEGER, completed_at INTEGER, failed_at INTEGER,
    cancelling_at INTEGER, cancelled_at INTEGER,
    total INTEGER NOT NULL DEFAULT 0,
    completed INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    input_tokens INTEGER NOT NULL DEFAULT 0,
    cached_tokens INTEGER NOT NULL DEFAULT 0,
    output_tokens INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS lines (
    batch INTEGER NOT NULL,             -- batches.seq
    line INTEGER NOT NULL,              -- the line's number in the input file, from 1
    offset INTEGER NOT NULL,            -- where it starts in the input file, in bytes
    length INTEGER NOT NULL,
    state INTEGER NOT NULL DEFAULT 0,   -- PENDING, COMPLETED (in the output file) or FAILED (in the error file)
    PRIMARY KEY (batch, line)
) WITHOUT ROWID;
"""


@dataclass
class Result:
    """A finished line: its output line, for the output file when `ok`, else the error file."""

    batch: int  # batches.seq
    line: int
    ok: bool
    data: bytes
    input_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0


class StoreBusy(Exception):
    """Another process has the folder: two runners would run the same lines."""


class Store:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.files_dir = self.root / "files"
        self.files_dir.mkdir(parents=True, exist_ok=True)
        # the kernel drops the lock with its process, however it ends: a killed server leaves none
        self._lock_file = open(self.root / LOCK_NAME, "a+")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.seek(0)
            holder = self._lock_file.read().strip() or "unknown"
            self._lock_file.close()
            raise StoreBusy(f"another process (pid {holder}) uses it") from None
        self._lock_file.truncate(0)
        self._lock_file.write(str(os.getpid()))
        self._lock_file.flush()
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self.db.executescript(SCHEMA)
        for stale in self.files_dir.glob(UPLOAD_PREFIX + "*"):
            stale.unlink(missing_ok=True)

    @property
    def db(self) -> sqlite3.Connection:
        """This thread's connection."""
        conn = getattr(self._local, "db", None)
        if conn is None:
            # check_same_thread off only so that close() may close every thread's connection
            conn = sqlite3.connect(self.root / DB_NAME, timeout=30, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")  # WAL: a commit survives a crash of the process
            self._local.db = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    def close(self) -> None:
        with self._lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()
        self._local = threading.local()
        self._lock_file.close()

    # ---- files ---------------------------------------------------------------------------------
    def path(self, file_id: str) -> Path:
        return self.files_dir / file_id

    def upload_path(self) -> Path:
        return self.files_dir / new_id(UPLOAD_PREFIX)

    def add_file(self, upload: Path, purpose: str, filename: str) -> dict:
        """Keeps a received upload as a new file."""
        file_id = new_id("file-")
        size = upload.stat().st_size
        os.replace(upload, self.path(file_id))
        with self.db as db:
            db.execute("INSERT INTO files (id, purpose, filename, bytes, created_at) VALUES (?, ?, ?, ?, ?)",
                       (file_id, purpose, filename, size, int(time.time())))
        return self.file(file_id)

    def file(self, file_id: str) -> dict | None:
        row = self.db.execute("SELECT * FROM files WHERE id = ?", (file_id,)).fetchone()
        return dict(row) if row else None

    def files(self, purpose: str | None, after: str | None, limit: int, newest_first: bool) -> tuple[list[dict], bool]:
        """A page of files after the one named `after`, and whether more follow."""
        where, args = [], []
        if purpose:
            where.append("purpose = ?")
            args.append(purpose)
        if after:
            where.append(f"seq {'<' if newest_first else '>'} (SELECT seq FROM files WHERE id = ?)")
            args.append(after)
        return self._page("files", where, args, limit, newest_first)

    def delete_file(self, file_id: str) -> None:
        with self.db as db:
            db.execute("DELETE FROM files WHERE id = ?", (file_id,))
        self.path(file_id).unlink(missing_ok=True)

    def users(self, file_id: str) -> list[dict]:
        """The unfinished batches that read or write the file."""
        rows = self.db.execute(
            f"SELECT id, status FROM batches WHERE status IN ({','.join('?' * len(UNFINISHED))}) AND "
            "? IN (input_file_id, output_file_id, error_file_id)", (*UNFINISHED, file_id)).fetchall()
        return [dict(r) for r in rows]

    # ---- batches -------------------------------------------------------------------------------
    def create_batch(self, endpoint: str, input_file_id: str, completion_window: str, metadata: dict | None,
                     lines: Iterable[tuple[int, int, int]]) -> dict:
        """A batch in status validating with every (number, offset, length) of `lines`, all in one
        transaction: an exception from `lines` (a bad line) leaves no trace of it."""
        batch_id = new_id("batch_")
        with self.db as db:
            seq = db.execute(
                "INSERT INTO batches (id, endpoint, input_file_id, completion_window, metadata, status, created_at) "
                "VALUES (?, ?, ?, ?, ?, 'validating', ?)",
                (batch_id, endpoint, input_file_id, completion_window,
                 json.dumps(metadata) if metadata is not None else None, int(time.time()))).lastrowid
            total = 0
            rows = ((seq, number, offset, length) for number, offset, length in lines)
            while chunk := list(itertools.islice(rows, CHUNK_LINES)):
                db.executemany("INSERT INTO lines (batch, line, offset, length) VALUES (?, ?, ?, ?)", chunk)
                total += len(chunk)
            db.execute("UPDATE batches SET total = ? WHERE seq = ?", (total, seq))
        return self.batch(batch_id)

    def batch(self, batch_id: str) -> dict | None:
        row = self.db.execute("SELECT * FROM batches WHERE id = ?", (batch_id,)).fetchone()
        return dict(row) if row else None

    def batches(self, after: str | None, limit: int) -> tuple[list[dict], bool]:
        """A page of batches, newest first, after the one named `after`; and whether more follow."""
        where = ["seq < (SELECT seq FROM batches WHERE id = ?)"] if after else []
        return self._page("batches", where, [after] if after else [], limit, True)

    def unfinished(self) -> list[dict]:
        rows = self.db.execute(f"SELECT * FROM batches WHERE status IN ({','.join('?' * len(UNFINISHED))}) "
                               "ORDER BY seq", UNFINISHED).fetchall()
        return [dict(r) for r in rows]

    def set_status(self, batch_id: str, status: str, errors: list[dict] | None = None) -> dict:
        """Moves a batch to `status` and stamps `<status>_at` (once: a resumed batch keeps its first)."""
        stamp = f"{status}_at"
        assert stamp in ("in_progress_at", "finalizing_at", "completed_at", "failed_at", "cancelling_at",
                         "cancelled_at"), status
        with self.db as db:
            db.execute(f"UPDATE batches SET status = ?, {stamp} = COALESCE({stamp}, ?), errors = COALESCE(?, errors) "
                       "WHERE id = ?", (status, int(time.time()), json.dumps(errors) if errors else None, batch_id))
        return self.batch(batch_id)

    def pending(self, batch: int, after: int, limit: int) -> list[tuple[int, int, int]]:
        """Up to `limit` pending lines numbered past `after`: (number, offset, length)."""
        rows = self.db.execute("SELECT line, offset, length FROM lines WHERE batch = ? AND line > ? AND state = ? "
                               "ORDER BY line LIMIT ?", (batch, after, PENDING, limit)).fetchall()
        return [tuple(r) for r in rows]

    def record(self, results: list[Result]) -> None:
        """Appends each result to its batch's output or error file (created with its first line) and
        commits the files' lengths, the lines' states and the batches' counts together."""
        with self.db as db:
            for seq, group in itertools.groupby(sorted(results, key=lambda r: r.batch), key=lambda r: r.batch):
                group = list(group)
                batch = db.execute("SELECT * FROM batches WHERE seq = ?", (seq,)).fetchone()
                for ok, column, name in ((True, "output_file_id", "output"), (False, "error_file_id", "error")):
                    data = b"".join(r.data for r in group if r.ok == ok)
                    if data:
                        self._append(db, batch, column, name, data)
                db.executemany("UPDATE lines SET state = ? WHERE batch = ? AND line = ?",
                               [(COMPLETED if r.ok else FAILED, seq, r.line) for r in group])
                db.execute("UPDATE batches SET completed = completed + ?, failed = failed + ?, input_tokens = "
                           "input_tokens + ?, cached_tokens = cached_tokens + ?, output_tokens = output_tokens + ? "
                           "WHERE seq = ?",
                           (sum(r.ok for r in group), sum(not r.ok for r in group), sum(r.input_tokens for r in group),
                            sum(r.cached_tokens for r in group), sum(r.output_tokens for r in group), seq))

    def _append(self, db: sqlite3.Connection, batch: sqlite3.Row, column: str, name: str, data: bytes) -> None:
        file_id = batch[column]
        if file_id is None:
            file_id = new_id("file-")
            db.execute("INSERT INTO files (id, purpose, filename, bytes, created_at) VALUES (?, 'batch_output', ?, "
                       "0, ?)", (file_id, f"{batch['id']}_{name}.jsonl", int(time.time())))
            db.execute(f"UPDATE batches SET {column} = ? WHERE seq = ?", (file_id, batch["seq"]))
        size = db.execute("SELECT bytes FROM files WHERE id = ?", (file_id,)).fetchone()[0]
        with open(self.path(file_id), "ab") as f:
            f.truncate(size)  # lines past the committed length never were: a crash came before their commit
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # on disk before the commit says so
        db.execute("UPDATE files SET bytes = ? WHERE id = ?", (size + len(data), file_id))

    def seal(self, batch_id: str) -> None:
        """Cuts a finished batch's output and error files to what they hold (no uncommitted tail)."""
        batch = self.batch(batch_id)
        for file_id in (batch["output_file_id"], batch["error_file_id"]):
            row = self.file(file_id) if file_id else None
            if row is not None:
                with open(self.path(file_id), "r+b") as f:
                    f.truncate(row["bytes"])
                    os.fsync(f.fileno())

    # ---- helpers -------------------------------------------------------------------------------
    def _page(self, table: str, where: list[str], args: list, limit: int, newest_first: bool) -> tuple[list[dict], bool]:
        sql = f"SELECT * FROM {table}" + (f" WHERE {' AND '.join(where)}" if where else "")
        sql += f" ORDER BY seq {'DESC' if newest_first else 'ASC'} LIMIT ?"
        rows = self.db.execute(sql, (*args, limit + 1)).fetchall()
        return [dict(r) for r in rows[:limit]], len(rows) > limit
