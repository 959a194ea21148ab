"""A request's token stream, as a gateway reads it for a client watching the
request (SSE): start it, look up an entry, and find the text so far when a
reader has lost its place (the gateway's StreamHub does the blocking reads). Workers write it (shared/store/scripts.py:
PROGRESS, FINISH, CANCEL); one Redis Stream per request, so any gateway
replica can serve any client, also after it reconnects elsewhere."""

from __future__ import annotations

import re
from dataclasses import dataclass

import redis.asyncio as aioredis

from shared.keys import Keys
from shared.schema import Status
from shared.store.scripts import ATTACH, SNAPSHOT

ENTRY_ID = re.compile(r"^\d{1,20}-\d{1,20}$")


@dataclass(frozen=True)
class StreamEntry:
    id: str
    at: int  # byte offset in the request's text where `delta` starts
    delta: str
    end: Status | None  # set on the last entry: how the request ended


@dataclass(frozen=True)
class Snapshot:
    text: str  # the text so far
    last_id: str  # the stream's last entry: reading after it continues `text`
    end: Status | None


def entry_key(entry_id: str) -> tuple[int, int]:
    """An entry id as a sortable pair (Redis ids are `<ms>-<seq>`)."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq)


class TokenStreams:
    def __init__(self, redis: aioredis.Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        self._attach = redis.register_script(ATTACH)
        self._snapshot = redis.register_script(SNAPSHOT)

    def _keys(self, request_id: str) -> list[str]:
        return [self.keys.request(request_id), self.keys.stream(request_id)]

    async def attach(self, request_id: str) -> bool:
        """Start the request's stream if nobody watches it yet. False: no such record."""
        args = [self.keys.stream_max_entries, self.keys.stream_ttl_seconds]
        return bool(await self._attach(keys=self._keys(request_id), args=args))

    async def entry(self, request_id: str, entry_id: str) -> StreamEntry | None:
        """One entry by id, or None if the stream doesn't hold it (trimmed, or never was)."""
        found = await self.redis.xrange(self.keys.stream(request_id), entry_id, entry_id)
        return stream_entry(*found[0]) if found else None

    async def first_id(self, request_id: str) -> str | None:
        found = await self.redis.xrange(self.keys.stream(request_id), count=1)
        return found[0][0] if found else None

    async def snapshot(self, request_id: str) -> Snapshot:
        text, last_id, end = await self._snapshot(keys=self._keys(request_id), args=[])
        return Snapshot(text, last_id, Status(end) if end else None)

    async def exists(self, request_id: str) -> bool:
        return bool(await self.redis.exists(self.keys.stream(request_id)))


def stream_entry(entry_id: str, fields: dict[str, str]) -> StreamEntry:
    """An entry as XREAD/XRANGE return it (decoded)."""
    end = fields.get("end")
    return StreamEntry(entry_id, int(fields.get("at", 0)), fields.get("d", ""), Status(end) if end else None)
