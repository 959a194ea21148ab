"""Following a request's text as its worker generates it, for SSE: the native
`GET /v1/requests/{id}/stream` and OpenAI's `stream: true` both read it here.

The worker's writes reach this gateway through the request's Redis Stream
(shared/store/streams.py), so it works whichever worker runs the request and
whichever gateway replica the client is connected to. The reader keeps its
byte position in the text: entries trimmed away before it read them (it fell
behind the stream's cap) come back from the record's text, and a run taken
over by another worker, whose text starts again, is reported as a reset.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal

from aiohttp import web

from shared.schema import Status
from shared.store.streams import TokenStreams

# How long one read waits for an entry before the reader checks on its client
# and the stream (an SSE comment keeps proxies from closing an idle connection).
IDLE_CHECK_MS = 1_000


class StreamGone(Exception):
    """The stream expired or Redis lost it (a restart) while a client watched."""


@dataclass(frozen=True)
class Piece:
    """The next thing a watcher of a request learns."""

    kind: Literal["delta", "reset", "end", "idle"]
    text: str = ""  # delta: new text; reset: the whole text so far, replacing what was sent
    id: str | None = None  # the stream entry it comes from: where a resumed read continues
    status: Status | None = None  # end: how the request ended


async def follow(streams: TokenStreams, request_id: str, after: str = "0-0",
                 position: int | None = 0) -> AsyncIterator[Piece]:
    """The request's text from stream entry `after` on, the reader holding its
    first `position` bytes (None: unknown, so it starts with the text so far),
    until it ends. Yields "idle" after each quiet second."""
    if position is None:
        snapshot = await streams.snapshot(request_id)
        yield Piece("reset", snapshot.text, snapshot.last_id)
        if snapshot.end is not None:
            yield Piece("end", id=snapshot.last_id, status=snapshot.end)
            return
        after, position = snapshot.last_id, len(snapshot.text.encode())
    while True:
        entries = await streams.read(request_id, after, IDLE_CHECK_MS)
        if not entries:
            if not await streams.exists(request_id):
                raise StreamGone(request_id)
            yield Piece("idle")
            continue
        for entry in entries:
            if entry.at != position:
                # Behind the cap (at > position) or started over (at < position): take
                # up from the record's text, which every entry so far has built.
                snapshot = await streams.snapshot(request_id)
                text = snapshot.text.encode()
                if entry.at > position:
                    yield Piece("delta", text[position:].decode(), snapshot.last_id)
                else:
                    yield Piece("reset", snapshot.text, snapshot.last_id)
                if snapshot.end is not None:
                    yield Piece("end", id=snapshot.last_id, status=snapshot.end)
                    return
                after, position = snapshot.last_id, len(text)
                break
            after = entry.id
            if entry.delta:
                position += len(entry.delta.encode())
                yield Piece("delta", entry.delta, entry.id)
            if entry.end is not None:
                yield Piece("end", id=entry.id, status=entry.end)
                return


def client_gone(request: web.Request) -> bool:
    """Whether the client has closed its connection. Read by polling rather than
    through aiohttp's handler_cancellation, which would cancel every handler on a
    disconnect, a submit included, halfway between recording and enqueueing."""
    transport = request.transport
    return transport is None or transport.is_closing()


async def open_event_stream(request: web.Request, headers: dict[str, str] | None = None) -> web.StreamResponse:
    response = web.StreamResponse(headers={
        "Content-Type": "text/event-stream", "Cache-Control": "no-cache",
        "X-Accel-Buffering": "no",  # nginx would otherwise hold events back
        **(headers or {}),
    })
    await response.prepare(request)
    return response


def sse_event(data: str, event: str | None = None, event_id: str | None = None) -> bytes:
    """One Server-Sent Event; `data` holds no newline (it is JSON)."""
    lines = [f"event: {event}"] if event else []
    if event_id:
        lines.append(f"id: {event_id}")
    lines.append(f"data: {data}")
    return ("\n".join(lines) + "\n\n").encode()


def sse_json(payload: dict, event: str | None = None, event_id: str | None = None) -> bytes:
    return sse_event(json.dumps(payload, separators=(",", ":")), event, event_id)


KEEP_ALIVE = b": keep-alive\n\n"
