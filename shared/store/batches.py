"""Batches in Redis (OpenAI's Batch API): a batch's hash (status, timestamps,
enqueue cursor, finished-line counters), the per-key and active indexes, the
lease one gateway holds while it works on a batch, and its lines' records.
Key names and lifetimes are in shared/keys.py; the scripts in scripts.py."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import redis.asyncio as aioredis

from shared.keys import Keys
from shared.store.fields import encode, flat
from shared.store.paging import newest_first
from shared.store.pipelining import run_script_batch
from shared.store.scripts import CREATE_LINE, DROP_LEASE, MOVE_BATCH, SETTLE_LINE, TAKE_LEASE

# Counters the line scripts increment (completed: succeeded; failed: failed or expired).
COUNTERS = ("completed", "failed", "cancelled")


class BatchStore:
    def __init__(self, redis: aioredis.Redis, keys: Keys, ttl_seconds: int) -> None:
        self.redis = redis
        self.keys = keys
        self.ttl_seconds = ttl_seconds
        self._move = redis.register_script(MOVE_BATCH)
        self._take_lease = redis.register_script(TAKE_LEASE)
        self._drop_lease = redis.register_script(DROP_LEASE)
        self._create_line = redis.register_script(CREATE_LINE)
        self._settle_line = redis.register_script(SETTLE_LINE)

    # ---- the batch ----------------------------------------------------------------

    async def create(self, batch_id: str, tenant: str | None, fields: Mapping[str, object], created_at: float) -> None:
        """A new batch, listed for its key and marked active, in one transaction."""
        key = self.keys.batch(batch_id)
        by_tenant = self.keys.batches_of(tenant or "")
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping=encode({**fields, **{name: 0 for name in COUNTERS}}))
            pipe.expire(key, self.ttl_seconds)
            pipe.zadd(by_tenant, {batch_id: created_at})
            pipe.expire(by_tenant, self.ttl_seconds)
            pipe.zadd(self.keys.active_batches, {batch_id: created_at})
            await pipe.execute()

    async def get(self, batch_id: str) -> dict[str, str] | None:
        found = await self.redis.hgetall(self.keys.batch(batch_id))
        return found or None

    async def set(self, batch_id: str, fields: Mapping[str, object]) -> None:
        await self.redis.hset(self.keys.batch(batch_id), mapping=encode(fields))

    async def move(self, batch_id: str, from_statuses: Sequence[str], to: str, fields: Mapping[str, object]) -> bool:
        """Set the status to `to` (with `fields`) only if it is one of `from_statuses`."""
        moved = await self._move(keys=[self.keys.batch(batch_id)], args=[",".join(from_statuses), to, flat(fields)])
        return bool(moved)

    async def ended(self, batch_id: str) -> None:
        """The batch needs no more work: off the active list, kept for the TTL from now."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zrem(self.keys.active_batches, batch_id)
            pipe.expire(self.keys.batch(batch_id), self.ttl_seconds)
            await pipe.execute()

    async def active(self) -> list[str]:
        """Batches some gateway still has work on, oldest first."""
        return await self.redis.zrange(self.keys.active_batches, 0, -1)

    async def page(self, tenant: str | None, after: str | None, limit: int) -> tuple[list[dict[str, str]], bool]:
        """A key's batches, newest first, after the batch `after`: (batches, more follow)."""
        by_tenant = self.keys.batches_of(tenant or "")
        ids, more = await newest_first(self.redis, by_tenant, after, limit)
        async with self.redis.pipeline(transaction=False) as pipe:
            for batch_id in ids:
                pipe.hgetall(self.keys.batch(batch_id))
            found = await pipe.execute()
        # A batch whose hash expired drops out of its index here.
        gone = [batch_id for batch_id, batch in zip(ids, found) if not batch]
        if gone:
            await self.redis.zrem(by_tenant, *gone)
        return [batch for batch in found if batch], more

    # ---- the lease -------------------------------------------------------------------

    async def take_lease(self, batch_id: str, owner: str, seconds: float) -> bool:
        """Take (or renew) the right to work on the batch; False while another gateway holds it."""
        return bool(await self._take_lease(keys=[self.keys.batch_lease(batch_id)], args=[owner, int(seconds * 1000)]))

    async def drop_lease(self, batch_id: str, owner: str) -> None:
        await self._drop_lease(keys=[self.keys.batch_lease(batch_id)], args=[owner])

    # ---- lines -----------------------------------------------------------------------

    async def create_lines(self, lines: Sequence[tuple[str, Mapping[str, object]]], ttl: int) -> list[str]:
        """Create each (id, fields) record unless it exists: 'created', or its status."""
        calls = [([self.keys.request(line_id)], [ttl, flat(fields)]) for line_id, fields in lines]
        return await run_script_batch(self._create_line, calls) if calls else []

    async def settle_lines(self, lines: Sequence[tuple[str, Mapping[str, object]]], status: str, counter: str,
                           error: tuple[str, str], leave_running: bool, ttl: int) -> int:
        """End each line (id, fields to create it with if missing) not yet final as `status`,
        counted as `counter`; running ones too unless `leave_running`. Returns how many it ended."""
        k = self.keys
        now = str(time.time())
        calls = [([k.request(line_id), k.done_channel, k.cancel_channel, k.stream(line_id)],
                  [now, ttl, line_id, status, counter, error[0], error[1], flat(fields),
                   "1" if leave_running else "0", k.stream_max_entries, k.stream_ttl_seconds])
                 for line_id, fields in lines]
        return sum(await run_script_batch(self._settle_line, calls)) if calls else 0

    async def line_records(self, line_ids: Sequence[str]) -> list[dict[str, str]]:
        """The records of these lines, in order, in one round trip ({} where one expired)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for line_id in line_ids:
                pipe.hgetall(self.keys.request(line_id))
            return await pipe.execute()
