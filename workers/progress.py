"""The text of running requests as engines yield it: appended to each record's
text so far (so `GET /v1/requests/{id}` shows it) and to the token stream of
those a client watches (SSE). Deltas that arrive while a write is in flight go
in the next one, so a worker makes one round trip at a time for all its
requests, and the engine never waits on Redis."""

from __future__ import annotations

import asyncio

import structlog

from shared.store import RequestStore
from workers.retry import is_transient

log = structlog.get_logger(__name__)


class ProgressWriter:
    def __init__(self, store: RequestStore, worker_name: str) -> None:
        self.store = store
        self.worker_name = worker_name
        self._pending: dict[str, list[str]] = {}
        self._ready = asyncio.Event()

    def add(self, request_id: str, delta: str) -> None:
        self._pending.setdefault(request_id, []).append(delta)
        self._ready.set()

    async def run(self) -> None:
        while True:
            await self._ready.wait()
            self._ready.clear()
            pending, self._pending = self._pending, {}
            try:
                await self.store.progress_many([(rid, "".join(d)) for rid, d in pending.items()], self.worker_name)
            except Exception as exc:
                if not is_transient(exc):
                    raise
                # Lost for watchers only: the result writer writes each final text whole,
                # and a watcher whose text no longer matches starts again from it.
                log.warning("progress_write_failed", error=str(exc), requests=len(pending))
