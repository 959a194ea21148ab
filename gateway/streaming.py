"""Following a request's text as its worker generates it, for SSE: the native
`GET /v1/requests/{id}/stream` and OpenAI's `stream: true` both read it here.

The worker's writes reach this gateway through the request's Redis Stream
(shared/store/streams.py), so it works whichever worker runs the request and
whichever gateway replica the client is connected to; one reader per gateway
(StreamHub) reads every stream its clients watch. The reader keeps its
byte position in the text: entries trimmed away before it read them (it fell
behind the stream's cap) come back from the record's text, and a run taken
over by another worker, whose text starts again, is reported as a reset.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal

import redis.asyncio as aioredis
import structlog
from aiohttp import web
from redis.exceptions import RedisError

from shared.keys import Keys
from shared.schema import Status
from shared.store import connect_redis
from shared.store.streams import StreamEntry, TokenStreams, entry_key, stream_entry

log = structlog.get_logger(__name__)

# How long one read waits for an entry before the reader checks on its client
# and the stream (an SSE comment keeps proxies from closing an idle connection).
IDLE_CHECK_MS = 1_000
# A gateway's wake-up stream outlives a crashed gateway only this long.
WAKE_TTL_SECONDS = 600


class StreamGone(Exception):
    """The stream expired or Redis lost it (a restart) while a client watched."""


@dataclass(frozen=True)
class Piece:
    """The next thing a watcher of a request learns."""

    kind: Literal["delta", "reset", "end", "idle"]
    text: str = ""  # delta: new text; reset: the whole text so far, replacing what was sent
    id: str | None = None  # the stream entry it comes from: where a resumed read continues
    status: Status | None = None  # end: how the request ended


class StreamHub:
    """Every token stream this gateway's clients watch, read by one blocking XREAD
    on a Redis connection of its own, so a watching client holds no connection of
    the gateway's pool (which a few dozen blocked reads would exhaust) and Redis
    sees one reader per gateway, not one per client.

    The XREAD also reads a wake-up stream of this gateway's own: a new watcher
    adds to it, which ends the XREAD in flight at once (or the next one, if it
    arrives in between), so its stream is read from then on without waiting out
    the block."""

    def __init__(self, redis_url: str, keys: Keys, redis: aioredis.Redis) -> None:
        self.keys = keys
        self.redis = redis  # the gateway's pool, for the wake-ups
        self.reading = connect_redis(redis_url, max_connections=1)
        self._wake_key = keys.gateway_wake(uuid.uuid4().hex)
        self._woken = "0-0"  # the last wake-up read
        self._watches: dict[str, set[Watch]] = {}  # by stream key
        self._reader: asyncio.Task | None = None

    async def watch(self, request_id: str, after: str) -> Watch:
        watch = Watch(self.keys.stream(request_id), after)
        self._watches.setdefault(watch.key, set()).add(watch)
        if self._reader is None or self._reader.done():
            self._reader = asyncio.create_task(self._read(), name="token-stream-hub")
        else:
            await self.redis.xadd(self._wake_key, {"w": "1"}, maxlen=1)
            await self.redis.expire(self._wake_key, WAKE_TTL_SECONDS)
        return watch

    def unwatch(self, watch: Watch) -> None:
        watches = self._watches.get(watch.key)
        if watches is not None:
            watches.discard(watch)
            if not watches:
                del self._watches[watch.key]

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        await self.reading.aclose()

    async def _read(self) -> None:
        while self._watches:
            # From each stream's least-advanced watcher; each watcher then takes what is new to it.
            streams = {key: min((w.after for w in watches), key=entry_key) for key, watches in self._watches.items()}
            try:
                answer = await self.reading.xread({**streams, self._wake_key: self._woken}, count=256,
                                                block=IDLE_CHECK_MS)
            except Exception as exc:  # every watcher ends with the error; clients may resume
                if not isinstance(exc, RedisError | OSError):
                    log.exception("stream_hub_failed")
                for watches in self._watches.values():
                    for watch in watches:
                        watch.queue.put_nowait(exc)
                self._watches.clear()
                return
            for key, entries in answer:
                if key == self._wake_key:
                    self._woken = entries[-1][0]
                    continue
                parsed = [stream_entry(entry_id, fields) for entry_id, fields in entries]
                for watch in self._watches.get(key, ()):
                    fresh = [e for e in parsed if entry_key(e.id) > entry_key(watch.after)]
                    if fresh:
                        watch.after = fresh[-1].id
                        watch.queue.put_nowait(fresh)


@dataclass(eq=False)
class Watch:
    """One client's place in one stream; the hub puts what it reads in `queue`."""

    key: str
    after: str
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)

    async def entries(self, timeout: float) -> list[StreamEntry]:
        """The next entries ([] if none came within `timeout` seconds)."""
        try:
            item = await asyncio.wait_for(self.queue.get(), timeout)
        except TimeoutError:
            return []
        if isinstance(item, Exception):
            raise item
        return item


async def follow(streams: TokenStreams, hub: StreamHub, request_id: str, after: str = "0-0",
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
    watch = await hub.watch(request_id, after)
    try:
        while True:
            entries = await watch.entries(IDLE_CHECK_MS / 1000)
            if not entries:
                if not await streams.exists(request_id):
                    raise StreamGone(request_id)
                yield Piece("idle")
                continue
            for entry in entries:
                if entry_key(entry.id) <= entry_key(after):
                    continue  # already taken from a snapshot
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
                    continue
                after = entry.id
                if entry.delta:
                    position += len(entry.delta.encode())
                    yield Piece("delta", entry.delta, entry.id)
                if entry.end is not None:
                    yield Piece("end", id=entry.id, status=entry.end)
                    return
    finally:
        hub.unwatch(watch)


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
