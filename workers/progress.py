"""The text of running requests as engines yield it: appended to each record's
text so far (so `GET /v1/requests/{id}` shows it) and to the token stream of
those a client watches (SSE). Deltas that arrive while a write is in flight go
in the next one, so a worker makes one round trip at a time for all its
requests, and the engine never waits on Redis.

Writes are at most one per `interval` seconds (LLMQ_STREAM_INTERVAL_MS), as
vLLM's `stream_interval` does it in tokens: every write costs the worker, Redis,
the gateway and the client something per request, and at high concurrency
that cost is taken from generation. A request's first text is never held back
(time to first token is what a waiting user feels)."""

from __future__ import annotations

import asyncio

import structlog

from shared.store import RequestStore
from workers.retry import is_transient

log = structlog.get_logger(__name__)


class ProgressWriter:
    def __init__(self, store: RequestStore, worker_name: str, interval: float = 0.0) -> None:
        self.store = store
        self.worker_name = worker_name
        self.interval = interval
        self._pending: dict[str, list[str]] = {}
        self._written: set[str] = set()  # running requests whose text has reached Redis
        self._ready = asyncio.Event()
        self._first = asyncio.Event()  # a request's first text is pending

    def add(self, request_id: str, delta: str) -> None:
        self._pending.setdefault(request_id, []).append(delta)
        self._ready.set()
        if request_id not in self._written:
            self._first.set()

    def forget(self, request_id: str) -> None:
        """The request ended: its result carries all its text, so what is pending is dropped."""
        self._pending.pop(request_id, None)
        self._written.discard(request_id)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        last_write = float("-inf")
        while True:
            await self._ready.wait()
            hold = self.interval - (loop.time() - last_write)
            if hold > 0 and not self._first.is_set():
                try:
                    await asyncio.wait_for(self._first.wait(), hold)
                except TimeoutError:
                    pass
            self._ready.clear()
            self._first.clear()
            pending, self._pending = self._pending, {}
            if not pending:
                continue
            self._written.update(pending)
            last_write = loop.time()
            try:
                await self.store.progress_many([(rid, "".join(d)) for rid, d in pending.items()], self.worker_name)
            except Exception as exc:
                if not is_transient(exc):
                    raise
                # Lost for watchers only: the result writer writes each final text whole,
                # and a watcher whose text no longer matches starts again from it.
                log.warning("progress_write_failed", error=str(exc), requests=len(pending))
