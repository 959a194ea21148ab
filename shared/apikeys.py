"""API keys: stored as SHA-256 hashes in Redis (never the key itself), each
with a name that owns the requests made with it.

Keys are 32 random bytes, so a plain SHA-256 is enough (no salt or slow hash
needed: there is no dictionary to guess from).
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import time

import redis.asyncio as aioredis

from shared.keys import API_KEY_CACHE_SECONDS, Keys

KEY_PREFIX = "llmq_"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class ApiKeyStore:
    def __init__(self, redis: aioredis.Redis, keys: Keys, cache_seconds: float = API_KEY_CACHE_SECONDS) -> None:
        self.redis = redis
        self.keys = keys
        self.cache_seconds = cache_seconds
        # Hash → (name, valid until): saves a Redis round trip per request; a
        # revoked key stops working within `cache_seconds`.
        self._cache: dict[str, tuple[str, float]] = {}

    async def create(self, name: str) -> str:
        """A new key for `name`; the only time the key itself is seen."""
        if not NAME_PATTERN.match(name):
            raise ValueError("a key name is 1-64 characters of letters, digits, '.', '_' or '-'")
        if name in {entry["name"] for entry in await self.list()}:
            raise ValueError(f"a key named {name!r} exists; revoke it first")
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        await self.redis.hset(self.keys.api_keys, hash_key(key), json.dumps({"name": name, "created_at": time.time()}))
        return key

    async def list(self) -> list[dict]:
        entries = await self.redis.hgetall(self.keys.api_keys)
        return sorted((json.loads(v) for v in entries.values()), key=lambda e: e["name"])

    async def revoke(self, name: str) -> bool:
        entries = await self.redis.hgetall(self.keys.api_keys)
        hashes = [h for h, v in entries.items() if json.loads(v)["name"] == name]
        if hashes:
            await self.redis.hdel(self.keys.api_keys, *hashes)
            await self.redis.delete(self.keys.webhook_secret(name))  # a new key of this name gets a new one
        return bool(hashes)

    async def name_of(self, key: str) -> str | None:
        """The name owning `key`, or None if it is unknown or revoked."""
        digest = hash_key(key)
        cached = self._cache.get(digest)
        now = time.monotonic()
        if cached and cached[1] > now:
            return cached[0]
        entry = await self.redis.hget(self.keys.api_keys, digest)
        if entry is None:
            self._cache.pop(digest, None)
            return None
        name = json.loads(entry)["name"]
        self._cache[digest] = (name, now + self.cache_seconds)
        return name
