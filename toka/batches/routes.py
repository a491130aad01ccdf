"""/v1/files and /v1/batches: OpenAI's Files and Batches API over the store, run by the runner.

A batch's input lines are checked whole when it is created (a bad line is a 400 naming it); their
bodies are checked as each runs, by the live routes' own code, so a body the API refuses becomes a
line of the error file and the batch goes on. The output file exists from the first result on and
grows as results are committed, so it can be read while the batch runs.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import msgspec
from aiohttp import web

from toka.batches import lines
from toka.batches.runner import BatchRunner
from toka.batches.store import DB_NAME, Store
from toka.server.api import APIError, decode_body

log = logging.getLogger("toka.batches")

PURPOSES = ("batch",)  # what an upload may be for; the batches' own files are batch_output
COMPLETION_WINDOWS = ("24h",)
MAX_METADATA = 16  # OpenAI's bounds on a batch's metadata
MAX_METADATA_KEY, MAX_METADATA_VALUE = 64, 512
FILES_PAGE, FILES_MAX = 10_000, 10_000  # OpenAI's default and largest page of files
BATCHES_PAGE, BATCHES_MAX = 20, 100
CHUNK = 1 << 20  # bytes read or written at a time when a file streams in or out
CANCELLABLE = ("validating", "in_progress")


class CreateBatch(msgspec.Struct, kw_only=True):
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None = None


def data_dir(cfg) -> Path:
    """--data-dir, else `data` in the toka cache folder."""
    from toka.default_model import cache_dir

    return Path(cfg.data_dir) if cfg.data_dir else cache_dir() / "data"


class Batches:
    """The Files and Batches routes of one server. The store opens on first use, or at `start()`
    when an earlier launch left one to resume: a server never asked for a file makes no folder."""

    def __init__(self, server):
        self.server = server
        self.cfg = server.cfg
        self.root = data_dir(self.cfg)
        self._store: Store | None = None
        self.runner: BatchRunner | None = None
        self.started = False

    def routes(self) -> list:
        return [
            web.post("/v1/files", self.upload),
            web.get("/v1/files", self.list_files),
            web.get("/v1/files/{id}", self.get_file),
            web.get("/v1/files/{id}/content", self.content),
            web.delete("/v1/files/{id}", self.delete_file),
            web.post("/v1/batches", self.create),
            web.get("/v1/batches", self.list_batches),
            web.get("/v1/batches/{id}", self.get_batch),
            web.post("/v1/batches/{id}/cancel", self.cancel),
        ]

    @property
    def store(self) -> Store:
        return self._store or self._open()

    def _open(self) -> Store:
        try:
            self._store = Store(self.root)
        except Exception as e:
            raise APIError(f"the data folder {self.root} (--data-dir) cannot be used: {e}", None, 500,
                           "server_error") from None
        self.runner = BatchRunner(self._store, self.server)
        if self.started:
            self.runner.start()
        return self._store

    def start(self) -> None:
        """The server serves: batches run from now on, beginning with those an earlier launch left."""
        self.started = True
        if self.runner is not None:
            self.runner.start()
        elif (self.root / DB_NAME).exists():
            try:
                self._open()  # and the runner starts
            except APIError as e:  # the server serves without batches; their routes answer the same error
                log.error("%s", e.message)

    async def close(self, app=None) -> None:
        if self.runner is not None:
            await self.runner.close()

    # ---- files ---------------------------------------------------------------------------------
    async def upload(self, request):
        if request.content_type != "multipart/form-data":
            raise APIError("POST /v1/files takes multipart/form-data with the fields purpose and file", None)
        limit = self.cfg.max_file_bytes
        if (request.content_length or 0) > limit + CHUNK:  # the form's other fields are far smaller than CHUNK
            raise self._too_large()
        store, reader = self.store, await request.multipart()
        purpose = filename = upload = None
        try:
            while (part := await reader.next()) is not None:
                if part.name == "purpose":
                    purpose = (await part.read()).decode("utf-8", "replace")
                elif part.name == "file" and upload is None:
                    filename, upload = part.filename or "file", store.upload_path()
                    await self._receive(part, upload, limit)
                else:
                    await part.release()
            if purpose not in PURPOSES:
                raise APIError(f"purpose must be {' or '.join(PURPOSES)}, not {purpose!r}", "purpose")
            if upload is None:
                raise APIError("the form has no file field", "file")
            row = await self.runner.write(store.add_file, upload, purpose, filename)
            upload = None
        finally:
            if upload is not None:
                upload.unlink(missing_ok=True)
        return web.json_response(file_object(row))

    async def _receive(self, part, path: Path, limit: int) -> None:
        size = 0
        with open(path, "wb") as f:
            while chunk := await part.read_chunk(CHUNK):
                size += len(chunk)
                if size > limit:
                    raise self._too_large()
                f.write(chunk)

    def _too_large(self) -> APIError:
        return APIError(f"the file exceeds {self.cfg.max_file_bytes} bytes (--max-file-bytes)", "file", 413)

    async def list_files(self, request):
        q = request.query
        order = q.get("order", "desc")
        if order not in ("asc", "desc"):
            raise APIError("order must be asc or desc", "order")
        after = self._cursor(q, lambda i: self.store.file(i))
        rows, more = self.store.files(q.get("purpose"), after, _limit(q, FILES_PAGE, FILES_MAX), order == "desc")
        return web.json_response(page([file_object(r) for r in rows], more))

    async def get_file(self, request):
        return web.json_response(file_object(self._named(request, "file")))

    async def content(self, request):
        row = self._named(request, "file")
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        resp.content_length = remaining = row["bytes"]  # the committed lines; a growing output may hold more
        await resp.prepare(request)
        with open(self.store.path(row["id"]), "rb") as f:
            while remaining > 0:
                chunk = f.read(min(CHUNK, remaining))
                if not chunk:
                    break
                remaining -= len(chunk)
                await resp.write(chunk)
        await resp.write_eof()
        return resp

    async def delete_file(self, request):
        row = self._named(request, "file")
        if users := self.store.users(row["id"]):
            b = users[0]
            raise APIError(f"the file belongs to the batch {b['id']}, which is {b['status']}: cancel it or let it "
                           "finish first", "file_id", 409)
        await self.runner.write(self.store.delete_file, row["id"])
        return web.json_response({"id": row["id"], "object": "file", "deleted": True})

    def _named(self, request, kind: str) -> dict:
        """The file or the batch the path names; 404 when there is none."""
        name = request.match_info["id"]
        row = self.store.file(name) if kind == "file" else self.store.batch(name)
        if row is None:
            raise not_found(kind, name, f"{kind}_id")
        return row

    # ---- batches -------------------------------------------------------------------------------
    async def create(self, request):
        req = decode_body(await request.read(), CreateBatch)
        if req.endpoint not in lines.ENDPOINTS:
            raise APIError(f"endpoint must be {' or '.join(lines.ENDPOINTS)}, not {req.endpoint!r}", "endpoint")
        if req.completion_window not in COMPLETION_WINDOWS:
            raise APIError(f"completion_window must be {' or '.join(COMPLETION_WINDOWS)}", "completion_window")
        _check_metadata(req.metadata)
        store = self.store
        source = store.file(req.input_file_id)
        if source is None:
            raise not_found("file", req.input_file_id, "input_file_id")
        if source["purpose"] != "batch":
            raise APIError(f"the input file must have purpose batch, not {source['purpose']}", "input_file_id")
        path, endpoints = store.path(req.input_file_id), (req.endpoint,)

        def index():  # read on the store's thread, inside the batch's transaction
            with open(path, "rb") as f:
                any_line = False
                for number, offset, length, _ in lines.scan(f, endpoints):
                    any_line = True
                    yield number, offset, length
            if not any_line:
                raise APIError(f"the input file {req.input_file_id} has no requests", "input_file_id")

        try:
            row = await self.runner.write(store.create_batch, req.endpoint, req.input_file_id,
                                          req.completion_window, req.metadata, index())
        except lines.LineError as e:
            raise APIError(f"the input file {req.input_file_id} is no batch of {req.endpoint} requests: {e}",
                           "input_file_id", code="invalid_batch_line") from None
        self.runner.add(row)
        return web.json_response(self.batch_object(row))

    async def list_batches(self, request):
        after = self._cursor(request.query, lambda i: self.store.batch(i))
        rows, more = self.store.batches(after, _limit(request.query, BATCHES_PAGE, BATCHES_MAX))
        return web.json_response(page([self.batch_object(r) for r in rows], more))

    async def get_batch(self, request):
        return web.json_response(self.batch_object(self._named(request, "batch")))

    async def cancel(self, request):
        row = self._named(request, "batch")
        if row["status"] not in CANCELLABLE:
            raise APIError(f"the batch {row['id']} is {row['status']}: only a batch validating or in progress can be "
                           "cancelled", "batch_id", 409)
        return web.json_response(self.batch_object(await self.runner.cancel(row["id"])))

    def _cursor(self, query, lookup) -> str | None:
        after = query.get("after")
        if after is not None and lookup(after) is None:
            raise APIError(f"after names {after!r}, which does not exist", "after")
        return after

    def batch_object(self, row: dict) -> dict:
        return {
            "id": row["id"], "object": "batch", "endpoint": row["endpoint"], "model": self.cfg.model_name,
            "errors": {"object": "list", "data": json.loads(row["errors"])} if row["errors"] else None,
            "input_file_id": row["input_file_id"], "completion_window": row["completion_window"],
            "status": row["status"], "output_file_id": row["output_file_id"], "error_file_id": row["error_file_id"],
            "created_at": row["created_at"], "in_progress_at": row["in_progress_at"], "expires_at": None,
            "finalizing_at": row["finalizing_at"], "completed_at": row["completed_at"], "failed_at": row["failed_at"],
            "expired_at": None, "cancelling_at": row["cancelling_at"], "cancelled_at": row["cancelled_at"],
            "request_counts": {"total": row["total"], "completed": row["completed"], "failed": row["failed"]},
            "usage": {"input_tokens": row["input_tokens"], "input_tokens_details": {"cached_tokens": row["cached_tokens"]},
                      "output_tokens": row["output_tokens"], "output_tokens_details": {"reasoning_tokens": 0},
                      "total_tokens": row["input_tokens"] + row["output_tokens"]},
            "metadata": json.loads(row["metadata"]) if row["metadata"] else None,
        }


def file_object(row: dict) -> dict:
    return {"id": row["id"], "object": "file", "bytes": row["bytes"], "created_at": row["created_at"],
            "filename": row["filename"], "purpose": row["purpose"], "status": "processed", "status_details": None,
            "expires_at": None}


def page(data: list[dict], more: bool) -> dict:
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": more}


def not_found(kind: str, name: str, param: str) -> APIError:
    return APIError(f"no {kind} {name!r}", param, 404, code="not_found")


def _limit(query, default: int, most: int) -> int:
    try:
        limit = int(query.get("limit", default))
    except ValueError:
        raise APIError("limit must be an integer", "limit") from None
    if not 1 <= limit <= most:
        raise APIError(f"limit must be in [1, {most}]", "limit")
    return limit


def _check_metadata(metadata: dict[str, str] | None) -> None:
    if metadata is None:
        return
    if len(metadata) > MAX_METADATA:
        raise APIError(f"metadata holds at most {MAX_METADATA} pairs", "metadata")
    for key, value in metadata.items():
        if len(key) > MAX_METADATA_KEY or len(value) > MAX_METADATA_VALUE:
            raise APIError(f"metadata keys are at most {MAX_METADATA_KEY} characters, values {MAX_METADATA_VALUE}",
                           "metadata")
