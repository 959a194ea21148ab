"""The Redis client as every llmq process configures it."""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError


def connect_redis(url: str, max_connections: int = 64) -> aioredis.Redis:
    # A blocking pool: a burst of requests queues for a connection instead of
    # failing with "Too many connections". Short timeouts: a dead Redis must
    # turn into a quick 503, not a hung request.
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=5,
        decode_responses=True,
        socket_timeout=5,
        socket_connect_timeout=2,
        health_check_interval=15,
        # After Redis restarts, every pooled connection is dead and fails on its next
        # use: one immediate retry on a fresh connection hides that, while a Redis
        # still down fails that retry at once (refused). Timeouts are not retried:
        # the command may have run. (A pool built by hand gets no retry by default.)
        retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
    )
    return aioredis.Redis.from_pool(pool)  # closing the client closes the pool
