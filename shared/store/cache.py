"""The result cache: the answers to deterministic requests, kept per API key, so
that a repeat is answered by the gateway from Redis without touching the queue.
Workers fill it as they write succeeded results; the gateway looks it up before
it admits a request. Both compute the entry's key with `cache_key`.

Each API key's entries are one hash (entry key -> the cached answer) beside a
sorted set of the same entry keys scored by when each expires, both under key
names fixed per API key (shared/keys.py): a script touches only the keys it is
given, expiry is exact per entry, and one key's entries can neither be read nor
evicted by another's. Per-entry string keys with their own TTL would need a
script to delete keys it computes (the evicted ones), and a hash field TTL
needs Redis 7.4.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import redis.asyncio as aioredis

from shared.keys import Keys
from shared.schema import RequestSpec
from shared.store.pipelining import AutoPipeline, run_script_batch
from shared.store.scripts import LUA_NOW

# Bumped when what an entry holds, or what its key covers, changes: old entries are then never read.
CACHE_FORMAT = 1
# What decides a deterministic request's output. Not its priority, deadline or
# metadata, which change when and how it runs, not its text.
_OUTPUT_FIELDS = {"model", "adapter", "input", "params"}

# KEYS: entries (hash), expiries (sorted set). ARGV: entry key.
# Returns the entry's JSON, or nil if there is none or it has expired.
LOOKUP = LUA_NOW + """
local expires = redis.call('ZSCORE', KEYS[2], ARGV[1])
if not expires or tonumber(expires) <= server_now() then return false end
return redis.call('HGET', KEYS[1], ARGV[1])
"""

# KEYS: entries, expiries, the request's record. ARGV: entry key, entry JSON, ttl seconds,
# most entries. Unless the record says its client asked to keep nothing (`no_store`),
# stores the entry, drops the expired ones, then the oldest beyond the bound; both
# keys expire with the newest entry, so an API key that stops using the cache leaves
# nothing. Returns 1 if stored, else 0.
FILL = LUA_NOW + """
if redis.call('HGET', KEYS[3], 'no_store') == '1' then return 0 end
local now, ttl = server_now(), tonumber(ARGV[3])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], now + ttl, ARGV[1])
local gone = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)
local over = redis.call('ZCARD', KEYS[2]) - #gone - tonumber(ARGV[4])
if over > 0 then
  local oldest = redis.call('ZRANGE', KEYS[2], #gone, #gone + over - 1)
  for _, key in ipairs(oldest) do gone[#gone + 1] = key end
end
for _, key in ipairs(gone) do  -- one by one: unpack() of thousands would overflow Lua's stack
  redis.call('HDEL', KEYS[1], key)
  redis.call('ZREM', KEYS[2], key)
end
redis.call('EXPIRE', KEYS[1], ttl)
redis.call('EXPIRE', KEYS[2], ttl)
return 1
"""


def cache_key(spec: RequestSpec, tenant: str | None) -> str | None:
    """The cache entry a request's answer lives under, or None when its output is not
    determined by what it asks (sampled, temperature > 0, without a seed).

    A SHA-256 over canonical JSON (sorted keys, pydantic's normalised values, so
    spelling, key order and defaults left out don't matter) of the API key's name
    and what decides the output. A request that names no model shares entries
    with others that name none: whichever worker serves it uses its default model,
    as without a cache.
    """
    params = spec.params
    if params.temperature > 0 and params.seed is None:
        return None
    what = {"v": CACHE_FORMAT, "tenant": tenant or "", **spec.model_dump(mode="json", include=_OUTPUT_FIELDS)}
    canonical = json.dumps(what, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class CachedAnswer:
    """What a cache hit answers with: the earlier request's output and usage."""

    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    model: str | None  # the model that served it

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)

    @classmethod
    def from_json(cls, raw: str) -> CachedAnswer:
        return cls(**json.loads(raw))


class ResultCache:
    """Lookups (the gateway) and fills (workers) of one deployment's result cache."""

    def __init__(self, redis: aioredis.Redis, keys: Keys, max_entries: int, max_entry_bytes: int) -> None:
        self.keys = keys
        self.max_entries = max_entries
        self.max_entry_bytes = max_entry_bytes
        self._fill = redis.register_script(FILL)
        # Auto-pipelined: lookups are on the submit path of every deterministic request.
        self._lookups = AutoPipeline(redis.register_script(LOOKUP))

    def _keys(self, tenant: str | None) -> list[str]:
        return [self.keys.cache_entries(tenant or ""), self.keys.cache_expiries(tenant or "")]

    async def lookup(self, tenant: str | None, key: str) -> CachedAnswer | None:
        raw = await self._lookups.call(self._keys(tenant), [key])
        return CachedAnswer.from_json(raw) if raw is not None else None

    def fits(self, answer: CachedAnswer) -> bool:
        """Whether an answer is small enough to keep (LLMQ_CACHE_MAX_ENTRY_BYTES)."""
        return len(answer.text.encode()) <= self.max_entry_bytes

    async def fill_many(self, fills: list[tuple[str, str | None, str, CachedAnswer]]) -> int:
        """Store each (request id, tenant, key, answer) that fits, unless the request's
        client sent `Cache-Control: no-store`, in one round trip. Returns how many were stored."""
        calls = [([*self._keys(tenant), self.keys.request(request_id)],
                  [key, answer.to_json(), self.keys.cache_ttl_seconds, self.max_entries])
                 for request_id, tenant, key, answer in fills if self.fits(answer)]
        return sum(await run_script_batch(self._fill, calls)) if calls else 0


def answered_fields(answer: CachedAnswer, now: float) -> dict[str, object]:
    """What a new record answered from the cache holds beside its base fields: final
    at once, with the cached output and usage, and marked as a cache hit."""
    return {
        "status": "succeeded",
        "started_at": now,
        "finished_at": now,
        "text": answer.text,
        "finish_reason": answer.finish_reason,
        "prompt_tokens": answer.prompt_tokens,
        "completion_tokens": answer.completion_tokens,
        "cache_hit": 1,
        **({"model": answer.model} if answer.model is not None else {}),
    }
