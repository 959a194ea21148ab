"""Retrying a Redis or Kafka call while the dependency is down or slow.

Whether an error is worth retrying is the error's own property: Kafka's errors
say so themselves (`retriable`); a timeout is, whoever raises it (the call may
have gone through, and everything the worker writes may be written twice); a
dropped or refused connection is. Anything else (a message too large for the
broker, an unknown topic name) fails the same way every time: it is raised.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import structlog
from aiokafka.errors import KafkaError, KafkaTimeoutError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

log = structlog.get_logger(__name__)
T = TypeVar("T")

# Longest pause between retries: a retry is one cheap call, and a longer pause
# is added to every result's latency after Redis comes back (bench/chaos.py).
RETRY_MAX_SECONDS = 1.0


def is_transient(exc: BaseException) -> bool:
    """The dependency is down or slow: the same call may work later."""
    if isinstance(exc, (KafkaTimeoutError, TimeoutError, RedisTimeoutError, RedisConnectionError)):
        return True
    if isinstance(exc, KafkaError):
        return exc.retriable
    return isinstance(exc, OSError)


async def retry(what: str, call: Callable[[], Awaitable[T]], stopping: asyncio.Event) -> T:
    """`call()` until it works while its errors are transient: results are never dropped.
    Once `stopping` is set it gives up after about 5 s, leaving the work uncommitted
    for the next worker."""
    backoff, tries = 0.1, 0
    while True:
        try:
            return await call()
        except Exception as exc:
            if not is_transient(exc):
                raise
            tries += 1
            if stopping.is_set() and tries > 8:
                raise
            log.warning("dependency_error_retrying", operation=what, error=str(exc), retry_in=backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, RETRY_MAX_SECONDS)
