"""Paging a per-key index (a sorted set of ids scored by creation time) newest first,
OpenAI's `after` / `limit` way: batches and fine-tuning jobs are listed so."""

from __future__ import annotations

import redis.asyncio as aioredis


async def newest_first(redis: aioredis.Redis, index: str, after: str | None, limit: int) -> tuple[list[str], bool]:
    """The ids after `after` (newest first), at most `limit`: (ids, more follow). An `after`
    that isn't in the index gives none."""
    start = 0
    if after is not None:
        rank = await redis.zrevrank(index, after)
        if rank is None:
            return [], False
        start = rank + 1
    ids = await redis.zrevrange(index, start, start + limit)  # one more than asked: whether more follow
    return ids[:limit], len(ids) > limit
