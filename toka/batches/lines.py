"""OpenAI's batch line format, read and written the same way by the server's batches and by toka-batch.

An input line asks for one request:
    {"custom_id": "q1", "method": "POST", "url": "/v1/chat/completions", "body": {...}}
an output line answers it, with the status and body the live route answers the same body with:
    {"id": "batch_req_...", "custom_id": "q1", "response": {"status_code": 200, "request_id": "...",
     "body": {...}}, "error": null}

Lines are numbered from 1 as an editor numbers them; blank lines are skipped (and counted).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from typing import BinaryIO

import msgspec

ENDPOINTS = ("/v1/completions", "/v1/chat/completions")
CHAT = "/v1/chat/completions"
BOM = b"\xef\xbb\xbf"


class LineError(ValueError):
    """A line that is no batch request: the whole batch is refused, naming the line."""

    def __init__(self, number: int, message: str):
        super().__init__(f"line {number}: {message}")
        self.number = number


class Request(msgspec.Struct):
    """One input line. `body` stays the line's own JSON bytes: the API decodes it as it decodes an
    HTTP body."""

    custom_id: str
    method: str
    url: str
    body: msgspec.Raw


_request = msgspec.json.Decoder(Request)


class _Id(msgspec.Struct):
    custom_id: str


_output_id = msgspec.json.Decoder(_Id)


def parse(raw: bytes, number: int, endpoints: tuple[str, ...]) -> Request:
    """Line `number` as a request to one of `endpoints`; raises LineError saying what is wrong."""
    try:
        req = _request.decode(raw.removeprefix(BOM))
    except msgspec.ValidationError as e:
        missing = re.search(r"missing required field `(\w+)`", str(e))
        raise LineError(number, f"lacks {missing[1]}" if missing else str(e)) from None
    except msgspec.DecodeError as e:
        raise LineError(number, f"is not JSON: {e}") from None
    if not req.custom_id:
        raise LineError(number, "custom_id is empty")
    if req.method != "POST":
        raise LineError(number, f"method must be POST, not {req.method!r}")
    if req.url not in endpoints:
        raise LineError(number, f"url {req.url!r} is not {' or '.join(endpoints)}")
    if not bytes(req.body).startswith(b"{"):
        raise LineError(number, "body must be a JSON object")
    return req


def scan(f: BinaryIO, endpoints: tuple[str, ...]) -> Iterator[tuple[int, int, int, str]]:
    """Every request line of `f`: (number, byte offset, length, custom_id), checked as `parse` checks
    them and for custom_ids used twice. Reads one line at a time."""
    seen: dict[str, int] = {}
    offset = 0
    for number, raw in enumerate(f, 1):
        if raw.strip():
            custom_id = parse(raw, number, endpoints).custom_id
            if custom_id in seen:
                raise LineError(number, f"repeats the custom_id {custom_id!r} of line {seen[custom_id]}")
            seen[custom_id] = number
            yield number, offset, len(raw), custom_id
        offset += len(raw)


def read(f: BinaryIO, offset: int, length: int) -> bytes:
    f.seek(offset)
    return f.read(length)


def result(custom_id: str, status: int, body: dict) -> bytes:
    """The output line of a request the API answered with `status` and `body`."""
    request_id = body.get("id") if status == 200 else None
    line = {"id": new_id("batch_req_"), "custom_id": custom_id,
            "response": {"status_code": status, "request_id": request_id or new_id("req_"), "body": body},
            "error": None}
    return msgspec.json.encode(line) + b"\n"


def usage(status: int, body: dict) -> tuple[int, int, int]:
    """(prompt tokens, of them cached, completion tokens) of an answer; zeros for an error."""
    u = body.get("usage") if status == 200 else None
    if not u:
        return 0, 0, 0
    return u["prompt_tokens"], (u.get("prompt_tokens_details") or {}).get("cached_tokens", 0), u["completion_tokens"]


def answered(f: BinaryIO) -> tuple[set[str], int]:
    """The custom_ids of an output file's lines, and where its last complete line ends: a last line
    without its newline was cut short (a writer killed mid-line) and does not count."""
    ids, end = set(), 0
    for number, raw in enumerate(f, 1):
        if not raw.endswith(b"\n"):
            break
        try:
            ids.add(_output_id.decode(raw).custom_id)
        except msgspec.DecodeError:
            raise LineError(number, "is not an output line (no custom_id)") from None
        end += len(raw)
    return ids, end


def new_id(prefix: str) -> str:
    return prefix + uuid.uuid4().hex
