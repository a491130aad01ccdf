"""The batch line format (toka/batches/lines.py): every bad line named by its number, blank lines
skipped, output lines in OpenAI's shape, an output file cut short by a kill, the flow window."""

from __future__ import annotations

import io
import json

import pytest

from toka.batches import flow, lines

GOOD = {"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}}


def jsonl(*items) -> bytes:
    return b"".join((item if isinstance(item, bytes) else json.dumps(item).encode()) + b"\n" for item in items)


def scan(data: bytes, endpoints=("/v1/completions",)):
    return list(lines.scan(io.BytesIO(data), endpoints))


def test_scan_gives_each_request_lines_number_offset_length_and_id():
    data = jsonl(GOOD, b"", b"   ", {**GOOD, "custom_id": "b"})
    index = scan(data)
    assert [(n, cid) for n, _, _, cid in index] == [(1, "a"), (4, "b")]
    for _, offset, length, cid in index:  # offsets read each line back whole
        assert json.loads(lines.read(io.BytesIO(data), offset, length))["custom_id"] == cid
    assert scan(lines.BOM + jsonl(GOOD))[0][3] == "a"  # an editor's byte-order mark
    assert scan(json.dumps(GOOD).encode())[0][3] == "a"  # no newline at the end


@pytest.mark.parametrize("bad, says", [
    (b"{not json", "is not JSON"),
    ({k: v for k, v in GOOD.items() if k != "custom_id"}, "lacks custom_id"),
    ({k: v for k, v in GOOD.items() if k != "method"}, "lacks method"),
    ({k: v for k, v in GOOD.items() if k != "url"}, "lacks url"),
    ({k: v for k, v in GOOD.items() if k != "body"}, "lacks body"),
    ({**GOOD, "url": "/v1/embeddings"}, "url '/v1/embeddings' is not /v1/completions"),
    ({**GOOD, "url": "/v1/chat/completions"}, "is not /v1/completions"),
    ({**GOOD, "method": "GET"}, "method must be POST"),
    ({**GOOD, "custom_id": 7}, "Expected `str`, got `int`"),
    ({**GOOD, "custom_id": ""}, "custom_id is empty"),
    ({**GOOD, "body": [1]}, "body must be a JSON object"),
    (b"[1, 2]", "Expected `object`"),
    ({**GOOD, "custom_id": "first"}, "repeats the custom_id 'first' of line 1"),
])
def test_a_bad_line_is_named_by_its_number(bad, says):
    data = jsonl({**GOOD, "custom_id": "first"}, b"", {**GOOD, "custom_id": "second"}, bad)
    with pytest.raises(lines.LineError) as e:
        scan(data)
    assert e.value.number == 4 and str(e.value).startswith("line 4: ") and says in str(e.value), str(e.value)


def test_result_lines_have_openai_shape():
    body = {"id": "cmpl-1", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 5,
                                                     "prompt_tokens_details": {"cached_tokens": 2}}}
    ok = json.loads(lines.result("q", 200, body))
    assert set(ok) == {"id", "custom_id", "response", "error"} and ok["id"].startswith("batch_req_")
    assert ok["custom_id"] == "q" and ok["error"] is None
    assert ok["response"] == {"status_code": 200, "request_id": "cmpl-1", "body": body}
    assert lines.usage(200, body) == (3, 2, 5)
    error = {"error": {"message": "no", "type": "invalid_request_error", "param": "n", "code": None}}
    bad = json.loads(lines.result("q", 400, error))
    assert bad["response"]["status_code"] == 400 and bad["response"]["body"] == error
    assert bad["response"]["request_id"].startswith("req_") and lines.usage(400, error) == (0, 0, 0)
    assert lines.result("q", 200, body).endswith(b"\n") and lines.result("q", 200, body).count(b"\n") == 1


def test_answered_stops_at_a_line_cut_short():
    data = lines.result("a", 200, {}) + lines.result("b", 400, {})
    assert lines.answered(io.BytesIO(data)) == ({"a", "b"}, len(data))
    cut = data + lines.result("c", 200, {})[:20]
    assert lines.answered(io.BytesIO(cut)) == ({"a", "b"}, len(data))
    with pytest.raises(lines.LineError, match="line 2: is not an output line"):
        lines.answered(io.BytesIO(lines.result("a", 200, {}) + b"hello\n"))  # not a file of ours: never cut


def test_the_window_fills_every_slot_and_a_few_more():
    assert flow.window(64, 1) == 64 + flow.MIN_HEADROOM
    assert flow.window(2048, 2) == 2 * (2048 + 2048 // 16)
    assert all(flow.headroom(s) >= flow.MIN_HEADROOM for s in (1, 16, 64, 4096))
