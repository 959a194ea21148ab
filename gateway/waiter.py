"""Long-polls (`GET /v1/requests/{id}?wait=N`): wait for a request to finish
without busy polling, woken by the workers' completion announcements."""

from __future__ import annotations

import asyncio
import time

import structlog

from shared.schema import RequestView
from shared.store import RequestStore

log = structlog.get_logger(__name__)


class CompletionWaiter:
    """Wakes long-polls when a request finishes, from one pub/sub subscription
    per process rather than one per waiting client.

    Subscribed only while someone waits (and for `linger` seconds after): a
    gateway nobody long-polls doesn't parse every completion of the cluster.
    """

    def __init__(self, store: RequestStore, linger: float = 30.0) -> None:
        self.store = store
        self.linger = linger
        self._waiters: dict[str, set[asyncio.Future[None]]] = {}
        self._listener: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            try:
                await self._listener
            except asyncio.CancelledError:
                pass
            except Exception:  # it ended on a Redis error, already logged
                pass
            self._listener = None

    async def _ensure_subscribed(self) -> None:
        if self._listener is None or self._listener.done():
            if self._listener is not None and not self._listener.cancelled():
                self._listener.exception()  # retrieved (it was logged when Redis went away), so asyncio doesn't warn
            self._subscribed.clear()
            self._listener = asyncio.create_task(self._listen(), name="completion-waiter")
        waiting = asyncio.ensure_future(self._subscribed.wait())
        await asyncio.wait([waiting, self._listener], return_when=asyncio.FIRST_COMPLETED)
        if not self._subscribed.is_set():
            waiting.cancel()
            self._listener.result()  # raises the Redis error that ended it

    async def _listen(self) -> None:
        async with self.store.redis.pubsub() as pubsub:
            await pubsub.subscribe(self.store.keys.done_channel)
            idle_since = None
            while True:
                try:
                    message = await pubsub.get_message(timeout=1.0)
                except Exception as exc:  # Redis gone: wake everyone so they re-read (and get the error)
                    log.warning("completion_listener_lost", error=str(exc))
                    self._wake_all()
                    raise
                if message is None:
                    if self._waiters:
                        idle_since = None
                    elif idle_since is None:
                        idle_since = time.monotonic()
                    elif time.monotonic() - idle_since > self.linger:
                        return  # nobody waits: stop receiving every completion
                elif message["type"] == "subscribe":
                    self._subscribed.set()
                elif message["type"] == "message":
                    for fut in self._waiters.get(message["data"], ()):
                        if not fut.done():
                            fut.set_result(None)

    def _wake_all(self) -> None:
        for futs in self._waiters.values():
            for fut in futs:
                if not fut.done():
                    fut.set_result(None)

    async def wait(self, request_id: str, timeout: float) -> RequestView | None:
        """The record once final, or as it is when `timeout` runs out."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            fut = loop.create_future()
            self._waiters.setdefault(request_id, set()).add(fut)
            try:
                # Subscribed and registered before reading, so a finish in between is not missed.
                await self._ensure_subscribed()
                view = await self.store.get(request_id)
                remaining = deadline - loop.time()
                if view is None or view.status.is_final or remaining <= 0:
                    return view
                try:
                    await asyncio.wait_for(fut, remaining)
                except TimeoutError:
                    pass
            finally:
                futs = self._waiters.get(request_id)
                if futs is not None:
                    futs.discard(fut)
                    if not futs:
                        del self._waiters[request_id]
