"""Fine-tuning jobs in Redis: a job's hash (spec, status, the trainer that holds it
and its lease, progress, eval figures), its events and checkpoints, the per-key
index, and the published models the gateway routes requests to. Key names and
lifetimes are in shared/keys.py; the scripts in scripts.py.

A job is held by one trainer at a time under a lease it renews with every
progress write; a trainer that dies lets the lease lapse, and the next trainer
the job's Kafka message reaches takes it over (resuming from its checkpoint).
Only the holder can end a running job, so a trainer that lost its lease can
never also publish: a job is trained to completion once.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from typing import Literal

import redis.asyncio as aioredis

from shared.keys import Keys
from shared.store.fields import encode, flat
from shared.store.paging import newest_first
from shared.store.scripts import CANCEL_TRAINING, CLAIM_TRAINING, END_TRAINING, QUEUE_TRAINING, RENEW_TRAINING
from shared.training import JobStatus

# Fields of a job's hash that hold JSON.
JSON_FIELDS = ("method", "metadata", "error", "progress", "eval", "hyperparameters", "strategy", "figures")
# The per-key lists jobs are in: fine-tuning jobs (OpenAI's list) and optimization jobs, apart.
JobIndex = Literal["fine_tuning", "optimization"]


def decode(found: Mapping[str, str]) -> dict[str, object]:
    """A job's hash as Python values (JSON fields parsed)."""
    job: dict[str, object] = dict(found)
    for name in JSON_FIELDS:
        if name in job:
            job[name] = json.loads(job[name])
    return job


class Claim:
    """What a trainer's claim on a job found."""

    ENDED = 0  # the job ended (or expired): nothing to do
    HELD = -1  # another trainer holds a live lease: wait for it to lapse


class TrainingStore:
    def __init__(self, redis: aioredis.Redis, keys: Keys, ttl_seconds: int) -> None:
        self.redis = redis
        self.keys = keys
        self.ttl_seconds = ttl_seconds
        self._claim = redis.register_script(CLAIM_TRAINING)
        self._renew = redis.register_script(RENEW_TRAINING)
        self._end = redis.register_script(END_TRAINING)
        self._cancel = redis.register_script(CANCEL_TRAINING)
        self._queue = redis.register_script(QUEUE_TRAINING)

    # ---- the job (gateway) ----------------------------------------------------------

    def _index(self, tenant: str | None, index: JobIndex) -> str:
        of = self.keys.optimization_jobs_of if index == "optimization" else self.keys.training_jobs_of
        return of(tenant or "")

    async def create(self, job_id: str, tenant: str | None, fields: Mapping[str, object], created_at: float,
                     index: JobIndex = "fine_tuning") -> None:
        """A new job, listed for its key (in `index`), in one transaction."""
        key = self.keys.training_job(job_id)
        by_tenant = self._index(tenant, index)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping=encode({**fields, "id": job_id, "tenant": tenant, "created_at": int(created_at),
                                           "attempts": 0}))
            pipe.expire(key, self.ttl_seconds)
            pipe.zadd(by_tenant, {job_id: created_at})
            pipe.expire(by_tenant, self.ttl_seconds)
            await pipe.execute()

    async def get(self, job_id: str) -> dict[str, object] | None:
        found = await self.redis.hgetall(self.keys.training_job(job_id))
        return decode(found) if found else None

    async def set(self, job_id: str, fields: Mapping[str, object]) -> None:
        await self.redis.hset(self.keys.training_job(job_id), mapping=encode(fields))

    async def page(self, tenant: str | None, after: str | None, limit: int,
                   index: JobIndex = "fine_tuning") -> tuple[list[dict[str, object]], bool]:
        """A key's jobs in `index`, newest first, after the job `after`: (jobs, more follow)."""
        ids, more = await newest_first(self.redis, self._index(tenant, index), after, limit)
        return [job for job in await self._many(ids) if job is not None], more

    async def _many(self, ids: Iterable[str]) -> list[dict[str, object] | None]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hgetall(self.keys.training_job(job_id))
            found = await pipe.execute()
        return [decode(f) if f else None for f in found]

    async def queue(self, job_id: str) -> bool:
        """`validating_files` → `queued` (its files passed); False if it was cancelled meanwhile."""
        return bool(await self._queue(keys=[self.keys.training_job(job_id)]))

    async def cancel(self, job_id: str) -> str | None:
        """Cancel: at once if not started; else asked of its trainer. The status it has now."""
        return await self._cancel(keys=[self.keys.training_job(job_id)], args=[time.time(), self.ttl_seconds])

    # ---- the job (trainer) ----------------------------------------------------------

    async def claim(self, job_id: str, trainer: str, lease_seconds: float) -> int:
        """Take the job: its attempt number (1 the first time), or Claim.ENDED / Claim.HELD."""
        return int(await self._claim(keys=[self.keys.training_job(job_id)],
                                     args=[trainer, lease_seconds, self.ttl_seconds]))

    async def renew(self, job_id: str, trainer: str, lease_seconds: float,
                    fields: Mapping[str, object] | None = None) -> tuple[bool, bool]:
        """Renew the lease (writing `fields`): (still ours, cancel asked for)."""
        renewed = int(await self._renew(keys=[self.keys.training_job(job_id)],
                                        args=[trainer, lease_seconds, flat(fields or {})]))
        return renewed > 0, renewed == 2

    async def end(self, job_id: str, trainer: str | None, status: JobStatus, fields: Mapping[str, object]) -> bool:
        """End the job with `status` if `trainer` still holds it (None: a job no trainer
        holds, e.g. one that failed before it started). False: it was not ours to end."""
        return bool(await self._end(keys=[self.keys.training_job(job_id)],
                                    args=[trainer or "", status.value,
                                          flat({**fields, "finished_at": int(time.time())}), self.ttl_seconds]))

    # ---- events and checkpoints -----------------------------------------------------

    async def add_event(self, job_id: str, message: str, level: str = "info", type_: str = "message",
                        data: Mapping[str, object] | None = None) -> None:
        """Append an event (OpenAI's fine_tuning.job.event); ids are the list's indexes."""
        key = self.keys.training_events(job_id)
        event = {"created_at": int(time.time()), "level": level, "message": message, "type": type_,
                 "data": dict(data or {})}
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.rpush(key, json.dumps(event))
            pipe.expire(key, self.ttl_seconds)
            await pipe.execute()

    async def events(self, job_id: str, after: int | None, limit: int) -> tuple[list[dict], bool]:
        """Events newest first, those before event number `after` (older): (events with their
        number `n`, more follow)."""
        key = self.keys.training_events(job_id)
        end = (after - 1) if after is not None else (await self.redis.llen(key)) - 1
        if end < 0:
            return [], False
        start = max(0, end - limit)  # one more than asked, to know whether more follow
        found = await self.redis.lrange(key, start, end)
        numbered = [{**json.loads(raw), "n": start + i} for i, raw in enumerate(found)][::-1]
        return numbered[:limit], len(numbered) > limit

    async def add_checkpoint(self, job_id: str, checkpoint: Mapping[str, object]) -> None:
        key = self.keys.training_checkpoints(job_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.rpush(key, json.dumps(dict(checkpoint)))
            pipe.expire(key, self.ttl_seconds)
            await pipe.execute()

    async def checkpoints(self, job_id: str) -> list[dict]:
        """Oldest first."""
        return [json.loads(raw) for raw in await self.redis.lrange(self.keys.training_checkpoints(job_id), 0, -1)]

    # ---- published models --------------------------------------------------------------

    async def publish(self, served_name: str, entry: Mapping[str, object]) -> None:
        await self.redis.hset(self.keys.fine_tuned_models, served_name, json.dumps(dict(entry)))

    async def published(self, served_name: str) -> dict | None:
        found = await self.redis.hget(self.keys.fine_tuned_models, served_name)
        return json.loads(found) if found else None

    async def all_published(self) -> dict[str, dict]:
        return {name: json.loads(entry) for name, entry in
                (await self.redis.hgetall(self.keys.fine_tuned_models)).items()}

    async def register_trainable(self, names: Iterable[str]) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hsetnx(self.keys.trainable_models, name, json.dumps({"registered_at": time.time()}))
            await pipe.execute()

    async def trainable(self) -> frozenset[str]:
        return frozenset(await self.redis.hkeys(self.keys.trainable_models))
