"""A batch file's lines: read in chunks that resume from where the last one ended
(what a gateway taking over a batch relies on), and each checked as its endpoint
would check it."""

from __future__ import annotations

import json

import pytest

from gateway.batches.lines import LineError, Place, RawLine, parse_line, read_lines
from gateway.settings import GatewaySettings

SETTINGS = GatewaySettings(max_tokens_limit=64)


def _line(custom_id: str, url: str = "/v1/chat/completions", **body) -> bytes:
    body = {"model": "echo", "messages": [{"role": "user", "content": "hi"}], **body}
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body}).encode() + b"\n"


async def test_chunks_resume_where_the_last_one_ended(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"".join(_line(f"c{i}") + (b"\n" if i % 3 == 0 else b"") for i in range(10)))
    whole = [raw async for chunk, _ in read_lines(path, 100) for raw in chunk]
    assert [r.index for r in whole] == list(range(10))  # blank lines don't count as requests

    read, place = [], Place()
    while True:
        chunks = read_lines(path, 3, place)
        try:
            chunk, place = await anext(chunks)  # one chunk, then start again from its end (a new gateway)
        except StopAsyncIteration:
            break
        finally:
            await chunks.aclose()
        read += chunk
    assert [(r.index, r.line, r.data) for r in read] == [(r.index, r.line, r.data) for r in whole]


@pytest.mark.parametrize(("data", "code", "param"), [
    (b"{not json", "invalid_json_line", None),
    (b"[1, 2]", "invalid_json_line", None),
    (_line(""), "invalid_custom_id", "custom_id"),
    (_line("a", url="/v1/completions"), "mismatched_endpoint", "url"),
    (json.dumps({"custom_id": "a", "method": "GET", "url": "/v1/chat/completions", "body": {}}).encode(),
     "invalid_method", "method"),
    (_line("a", n=2), "unsupported_parameter", "body.n"),
    (_line("a", stream=True), "invalid_value", "body.stream"),
    (_line("a", max_tokens=65), "invalid_value", "body.max_tokens"),
    (_line("a", max_tokens=8, metadata={f"k{i}": "v" for i in range(16)}), "invalid_value", "body.metadata"),
    # A line gets no webhook of its own: the batch's tells of the whole batch.
    (_line("a", max_tokens=8, webhook="https://hooks.example/h"), "invalid_value", "body.webhook"),
    (_line("a", max_tokens=8, webhook_events_filter=["completed"]), "invalid_value", "body.webhook_events_filter"),
])
def test_a_line_the_endpoint_would_refuse_says_why(data, code, param):
    with pytest.raises(LineError) as refused:
        parse_line(RawLine(0, 7, data), "/v1/chat/completions", SETTINGS)
    assert (refused.value.code, refused.value.param, refused.value.line) == (code, param, 7)
    assert refused.value.message


def test_a_good_line_is_the_request_it_asks_for():
    line = parse_line(RawLine(4, 5, _line("q4", max_tokens=8)), "/v1/chat/completions", SETTINGS)
    assert (line.index, line.custom_id, line.call.kind, line.call.spec.model) == (4, "q4", "chat", "echo")
    assert line.call.spec.params.max_tokens == 8
