"""The models a deployment serves, as its workers register them: each worker
adds its model's names when it starts, so the gateway can refuse a request for
a model no worker serves before it is queued, also while workers are scaled
to zero."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable

import redis.asyncio as aioredis

from shared.keys import SERVED_MODELS_CACHE_SECONDS, Keys


class ServedModels:
    def __init__(self, redis: aioredis.Redis, keys: Keys, cache_seconds: float = SERVED_MODELS_CACHE_SECONDS) -> None:
        self.redis = redis
        self.keys = keys
        self.cache_seconds = cache_seconds
        self._names: frozenset[str] = frozenset()
        self._read_at = float("-inf")

    async def register(self, names: Iterable[str], engine: str) -> None:
        """Add `names`, keeping when each was first registered."""
        entry = json.dumps({"engine": engine, "registered_at": time.time()})
        async with self.redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hsetnx(self.keys.models, name, entry)
            await pipe.execute()

    async def registered(self) -> dict[str, float]:
        """Every registered name, with when a worker first registered it."""
        entries = await self.redis.hgetall(self.keys.models)
        return {name: json.loads(entry)["registered_at"] for name, entry in entries.items()}

    async def names(self) -> frozenset[str]:
        """Every registered name, read at most once per `cache_seconds`."""
        if time.monotonic() - self._read_at > self.cache_seconds:
            self._names = frozenset(await self.redis.hkeys(self.keys.models))
            self._read_at = time.monotonic()
        return self._names

    async def serves(self, name: str) -> bool:
        """Whether a worker serves `name`; True while no worker has registered anything
        (nothing to judge by: the worker that takes the request decides)."""
        names = await self.names()
        return not names or name in names
