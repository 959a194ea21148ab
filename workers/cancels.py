"""Cancels reaching a worker: a DELETE of a running request is announced on a
Redis channel, and the worker running it aborts it in the engine."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis
import structlog

from workers.retry import RETRY_MAX_SECONDS, is_transient
from workers.runner import Runner

log = structlog.get_logger(__name__)


class CancelListener:
    def __init__(self, redis: aioredis.Redis, channel: str, runner: Runner) -> None:
        self.redis = redis
        self.channel = channel
        self.runner = runner

    async def run(self) -> None:
        backoff = 0.1
        while True:
            try:
                async with self.redis.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(self.channel)
                    backoff = 0.1
                    async for message in pubsub.listen():
                        data = message["data"]
                        await self.runner.cancel(data.decode() if isinstance(data, bytes) else str(data))
            except Exception as exc:
                if not is_transient(exc):
                    raise
                # A cancel missed while Redis is down only costs the work: the
                # finished result is not written over the cancelled record.
                log.warning("cancel_listener_reconnecting", error=str(exc), retry_in=backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, RETRY_MAX_SECONDS)
