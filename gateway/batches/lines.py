"""A batch's input lines: read from the file in bounded chunks (from a byte offset,
so an enqueue resumes where it was), and each checked as the OpenAI endpoint it
names would check its body, so a batch that validates has no line the endpoint
would refuse."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from gateway.openai_compat import Kind, OpenAICall, OpenAIError, limit_error, openai_call
from gateway.settings import GatewaySettings
from shared.schema import MAX_METADATA_ITEMS

ENDPOINTS: dict[str, Kind] = {"/v1/chat/completions": "chat", "/v1/completions": "completion"}
# The key of a line's metadata (on its record and message) that names its batch.
BATCH_METADATA_KEY = "llmq_batch"
MAX_CUSTOM_ID_CHARS = 512  # what fits a record field and an error line comfortably


@dataclass(frozen=True)
class RawLine:
    index: int  # the request's place in the batch, 0-based (blank lines don't count)
    line: int  # its line in the file, 1-based (what errors name)
    data: bytes


@dataclass(frozen=True)
class Line:
    index: int
    custom_id: str
    call: OpenAICall


class LineError(Exception):
    """A line the batch can't take: OpenAI's `errors.data[]` entry."""

    def __init__(self, code: str, message: str, line: int, param: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.line, self.param = code, message, line, param

    def entry(self) -> dict:
        return {"code": self.code, "message": self.message, "param": self.param, "line": self.line}


# A chunk holds at most this many bytes of lines as well as at most `chunk` lines, and
# a line longer than MAX_LINE_BYTES is never held whole: memory stays bounded whatever
# the file (one line of 100 MB, say).
CHUNK_BYTES = 8 * 1024 * 1024
MAX_LINE_BYTES = 4 * 1024 * 1024
TOO_LONG = b"\x00too long"  # stands for a line over MAX_LINE_BYTES (never valid JSON)


def _read_from(path: Path, offset: int, count: int) -> tuple[list[bytes], int]:
    """Up to `count` lines (or CHUNK_BYTES) from byte `offset`, blank ones included, and
    the offset after them."""
    lines, size = [], 0
    with open(path, "rb") as f:
        f.seek(offset)
        while len(lines) < count and size < CHUNK_BYTES and (raw := f.readline(MAX_LINE_BYTES + 1)):
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                while (rest := f.readline(MAX_LINE_BYTES)) and not rest.endswith(b"\n"):
                    pass  # skip the rest of the line
                raw = TOO_LONG
            lines.append(raw)
            size += len(raw)
        return lines, f.tell()


@dataclass(frozen=True)
class Place:
    """Where a read stopped in a batch's file: byte offset, next request index, next file line."""

    offset: int = 0
    index: int = 0
    line: int = 1


async def read_lines(path: Path, chunk: int, place: Place = Place()) -> AsyncIterator[tuple[list[RawLine], Place]]:
    """The file's non-blank lines in chunks of up to `chunk`, from `place`: yields (lines,
    the place after them)."""
    offset, index, line = place.offset, place.index, place.line
    while True:
        raws, offset = await asyncio.to_thread(_read_from, path, offset, chunk)
        if not raws:
            return
        lines = []
        for raw in raws:
            if raw.strip():
                lines.append(RawLine(index, line, raw))
                index += 1
            line += 1
        yield lines, Place(offset, index, line)


def parse_line(raw: RawLine, endpoint: str, settings: GatewaySettings) -> Line:
    """One line as the request it asks for; LineError if the endpoint would refuse it."""
    if raw.data == TOO_LONG:
        raise LineError("line_too_long", f"the line is over {MAX_LINE_BYTES} bytes", raw.line)
    try:
        entry = json.loads(raw.data)
    except (ValueError, RecursionError):
        raise LineError("invalid_json_line", "the line is not valid JSON", raw.line) from None
    if not isinstance(entry, dict):
        raise LineError("invalid_json_line", "the line must be a JSON object", raw.line)
    unknown = set(entry) - {"custom_id", "method", "url", "body"}
    if unknown:
        raise LineError("unknown_parameter", f"unknown field {sorted(unknown)[0]!r}", raw.line, sorted(unknown)[0])
    custom_id = entry.get("custom_id")
    if not isinstance(custom_id, str) or not 0 < len(custom_id) <= MAX_CUSTOM_ID_CHARS:
        raise LineError("invalid_custom_id", f"custom_id: must be a string of 1 to {MAX_CUSTOM_ID_CHARS} "
                        "characters", raw.line, "custom_id")
    if entry.get("method") != "POST":
        raise LineError("invalid_method", "method: must be POST", raw.line, "method")
    if entry.get("url") != endpoint:
        raise LineError("mismatched_endpoint", f"url: {entry.get('url')!r} is not the batch's endpoint {endpoint!r}",
                        raw.line, "url")
    try:
        call = openai_call(ENDPOINTS[endpoint], entry.get("body"))
        if call.stream:
            raise OpenAIError(400, "'stream' is not supported in a batch", "stream", "invalid_value")
        over = call.spec.over_limits(settings.max_prompt_chars, settings.max_tokens_limit)
        if over is not None:
            raise limit_error(call, over)
        if call.spec.webhook is not None or call.spec.webhook_events_filter is not None:
            # The batch's own webhook tells of the whole batch; a line's would POST once per
            # line, to a URL the create-time guard never saw.
            param = "webhook" if call.spec.webhook is not None else "webhook_events_filter"
            raise OpenAIError(400, f"{param}: a batch line gets no webhook of its own; give the batch one "
                              "(`webhook` of POST /v1/batches)", param, "invalid_value")
        if len(call.spec.metadata) >= MAX_METADATA_ITEMS:
            raise OpenAIError(400, f"metadata: at most {MAX_METADATA_ITEMS - 1} items in a batch line (llmq "
                              "adds one naming the batch)", "metadata", "invalid_value")
    except OpenAIError as exc:
        param = f"body.{exc.param}" if exc.param else "body"
        raise LineError(exc.code or "invalid_request", exc.message, raw.line, param) from None
    return Line(raw.index, custom_id, call)
