"""The request record in Redis: create, claim, finish, cancel, read, wait.

Status only moves forward (queued → running → final). Each transition is one
Lua script, so two workers or a worker and a cancelling client can't both win.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone

import redis.asyncio as aioredis
import structlog
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError

from shared.keys import Keys
from shared.schema import (
    ErrorDetail,
    Output,
    RequestSpec,
    RequestView,
    Status,
    Timings,
    Usage,
)

log = structlog.get_logger(__name__)

# Writes `fields` (a flat JSON array k1, v1, k2, v2 ...) as an HSET.
_LUA_HSET_JSON = """
local function hset_json(key, encoded)
  local flat = cjson.decode(encoded)
  if #flat > 0 then redis.call('HSET', key, unpack(flat)) end
end
"""

# KEYS: record. ARGV: now, worker, ttl, fields to create a missing record with.
# Returns {verdict, attempts}: verdict 'run', or the final status to skip.
_CLAIM = _LUA_HSET_JSON + """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then
  hset_json(KEYS[1], ARGV[4])
  status = 'queued'
end
if status == 'queued' or status == 'running' then
  redis.call('HSET', KEYS[1], 'status', 'running', 'started_at', ARGV[1], 'worker', ARGV[2])
  local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
  redis.call('EXPIRE', KEYS[1], ARGV[3])
  return {'run', attempts}
end
return {status, 0}
"""

# KEYS: record, done channel. ARGV: ttl, result fields, fields to create a
# missing record with, id. Returns 1 if written, 0 if the record was final.
_FINISH = _LUA_HSET_JSON + """
local status = redis.call('HGET', KEYS[1], 'status')
if status and status ~= 'queued' and status ~= 'running' then return 0 end
if not status then hset_json(KEYS[1], ARGV[3]) end
hset_json(KEYS[1], ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('PUBLISH', KEYS[2], ARGV[4])
return 1
"""

# Admission: one token from the caller's bucket (if rate-limited), then the new record.
# KEYS: bucket, record. ARGV: rate per second (0: no limit), burst, ttl, fields.
# Returns 0 if created, else the seconds until a token is free.
_ADMIT = _LUA_HSET_JSON + """
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
if rate > 0 then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
  local bucket = redis.call('HMGET', KEYS[1], 'tokens', 'at')
  local tokens = math.min(burst, (tonumber(bucket[1]) or burst) + (now - (tonumber(bucket[2]) or now)) * rate)
  if tokens < 1 then return tostring((1 - tokens) / rate) end
  redis.call('HSET', KEYS[1], 'tokens', tostring(tokens - 1), 'at', tostring(now))
  redis.call('EXPIRE', KEYS[1], math.ceil(burst / rate) + 1)
end
hset_json(KEYS[2], ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[3])
return 0
"""

# KEYS: record, done channel, cancel channel. ARGV: now, ttl, id.
# Returns 'cancelled' if this call cancelled it, the status if it was final, nil if unknown.
_CANCEL = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return false end
if status == 'queued' or status == 'running' then
  redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished_at', ARGV[1], 'finish_reason', 'cancelled')
  redis.call('EXPIRE', KEYS[1], ARGV[2])
  redis.call('PUBLISH', KEYS[2], ARGV[3])
  redis.call('PUBLISH', KEYS[3], ARGV[3])
  return 'cancelled'
end
return status
"""


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


def _encode(fields: Mapping[str, object]) -> dict[str, str]:
    """Hash fields as Redis stores them: None left out, dicts as JSON, the rest as str."""
    return {
        key: json.dumps(value) if isinstance(value, dict) else str(value)
        for key, value in fields.items()
        if value is not None
    }


def _flat(fields: Mapping[str, object]) -> str:
    """Fields as the flat JSON array [k1, v1, k2, v2, ...] the Lua scripts take."""
    return json.dumps([part for pair in _encode(fields).items() for part in pair])


def base_fields(request_id: str, spec: RequestSpec, submitted_at: float, source: str,
                tenant: str | None = None) -> dict[str, object]:
    """What a new record holds before any worker touches it."""
    return {
        "tenant": tenant,
        "id": request_id,
        "status": Status.queued.value,
        "model": spec.model,
        "adapter": spec.adapter,
        "submitted_at": submitted_at,
        "metadata": spec.metadata or None,
        "source": source,
        "attempts": 0,
    }


@dataclass
class Outcome:
    """How one request ended, as a worker reports it."""

    request_id: str
    status: Status
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error_type: str | None = None
    error_message: str | None = None
    finished_at: float = field(default_factory=time.time)

    def fields(self) -> dict[str, object]:
        out: dict[str, object] = {
            "status": self.status.value,
            "finished_at": self.finished_at,
            "text": self.text,
            "finish_reason": self.finish_reason,
            "error_type": self.error_type,
            "error_message": self.error_message,
        }
        if self.status is Status.succeeded:
            out["prompt_tokens"] = self.prompt_tokens
            out["completion_tokens"] = self.completion_tokens
        return out


class RequestStore:
    def __init__(self, redis: aioredis.Redis, keys: Keys, ttl_seconds: int) -> None:
        self.redis = redis
        self.keys = keys
        self.ttl_seconds = ttl_seconds
        self._claim = redis.register_script(_CLAIM)
        self._finish = redis.register_script(_FINISH)
        self._cancel = redis.register_script(_CANCEL)
        self._admit = redis.register_script(_ADMIT)
        self._admissions = _AutoPipeline(self._admit)

    async def create(self, fields: Mapping[str, object], rate: float = 0.0, burst: int = 1) -> float:
        """Create a new record, after taking a token from its tenant's bucket when
        `rate` > 0 (one script for both). Returns 0, or the seconds to wait when
        the tenant is over its rate (nothing is created then)."""
        bucket = self.keys.rate_limit(str(fields.get("tenant") or ""))
        retry_after = await self._admissions.call(
            [bucket, self.keys.request(str(fields["id"]))], [rate, burst, self.ttl_seconds, _flat(fields)]
        )
        return float(retry_after)

    async def claim_many(
        self, claims: Iterable[tuple[str, Mapping[str, object]]], worker: str
    ) -> list[tuple[str, int]]:
        """Mark each (id, create-fields) running. Returns (verdict, attempts) per id, in order."""
        now = str(time.time())
        calls = [([self.keys.request(request_id)], [now, worker, self.ttl_seconds, _flat(create)])
                 for request_id, create in claims]
        return [(verdict, int(attempts)) for verdict, attempts in await run_script_batch(self._claim, calls)]

    async def finish_many(self, outcomes: Iterable[tuple[Outcome, Mapping[str, object]]]) -> list[bool]:
        """Write each outcome unless its record is already final. True where written."""
        calls = [([self.keys.request(outcome.request_id), self.keys.done_channel],
                  [self.ttl_seconds, _flat(outcome.fields()), _flat(create), outcome.request_id])
                 for outcome, create in outcomes]
        return [bool(written) for written in await run_script_batch(self._finish, calls)]

    async def cancel(self, request_id: str) -> str | None:
        keys = [self.keys.request(request_id), self.keys.done_channel, self.keys.cancel_channel]
        return await self._cancel(keys=keys, args=[time.time(), self.ttl_seconds, request_id])

    async def get(self, request_id: str) -> RequestView | None:
        record = await self.redis.hgetall(self.keys.request(request_id))
        return view_of(record) if record else None


async def run_script_batch(script, calls: list[tuple[list, list]], raise_on_error: bool = True) -> list:
    """Run one Lua script once per (keys, args) in a single pipeline round trip.

    EVALSHA directly rather than redis-py's pipelined Script, which asks SCRIPT
    EXISTS before every pipeline (a second round trip); the script is loaded
    again only when Redis says it doesn't know it (after a restart or flush).
    """
    async def execute() -> list:
        async with script.registered_client.pipeline(transaction=False) as pipe:
            for keys, args in calls:
                pipe.evalsha(script.sha, len(keys), *keys, *args)
            results = await pipe.execute(raise_on_error=False)
        if any(isinstance(r, NoScriptError) for r in results):
            raise NoScriptError("script not loaded")
        return results

    try:
        results = await execute()
    except NoScriptError:
        script.sha = await script.registered_client.script_load(script.script)
        results = await execute()
    if raise_on_error:
        for result in results:
            if isinstance(result, Exception):
                raise result
    return results


class _AutoPipeline:
    """Runs the calls of one Lua script that arrive in the same event-loop turn
    as one pipeline: one round trip and one pass through the client for many
    concurrent HTTP requests (ioredis calls this auto-pipelining; redis-py has
    none). Measured on the gateway's submit path, the per-request Redis
    client cost was most of its CPU time.
    """

    def __init__(self, script) -> None:
        self.script = script
        self._pending: list[tuple[list, list, asyncio.Future]] = []
        self._flushing: set[asyncio.Task] = set()

    async def call(self, keys: list, args: list):
        future = asyncio.get_running_loop().create_future()
        self._pending.append((keys, args, future))
        if len(self._pending) == 1:
            asyncio.get_running_loop().call_soon(self._flush)
        return await future

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        task = asyncio.create_task(self._run(batch))
        self._flushing.add(task)  # a reference, so the task isn't collected mid-flight
        task.add_done_callback(self._flushing.discard)

    async def _run(self, batch: list) -> None:
        try:
            results = await run_script_batch(self.script, [(keys, args) for keys, args, _ in batch],
                                             raise_on_error=False)
        except Exception as exc:
            results = [exc] * len(batch)
        for (*_, future), result in zip(batch, results):
            if future.done():
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)


def _ts(value: str | None) -> float | None:
    return float(value) if value else None


def _dt(value: float | None) -> datetime | None:
    return datetime.fromtimestamp(value, tz=timezone.utc) if value is not None else None


def _seconds(start: float | None, end: float | None) -> float | None:
    return round(end - start, 6) if start is not None and end is not None else None


def view_of(record: Mapping[str, str]) -> RequestView:
    status = Status(record["status"])
    submitted, started, finished = (_ts(record.get(k)) for k in ("submitted_at", "started_at", "finished_at"))
    output = usage = error = None
    if status is Status.succeeded:
        output = Output(text=record.get("text", ""), finish_reason=record.get("finish_reason"))
        prompt, completion = int(record.get("prompt_tokens", 0)), int(record.get("completion_tokens", 0))
        usage = Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)
    if record.get("error_type"):
        error = ErrorDetail(type=record["error_type"], message=record.get("error_message", ""))
    return RequestView(
        id=record["id"],
        status=status,
        model=record.get("model"),
        adapter=record.get("adapter"),
        output=output,
        usage=usage,
        error=error,
        attempts=int(record.get("attempts", 0)),
        tenant=record.get("tenant"),
        metadata=json.loads(record["metadata"]) if record.get("metadata") else {},
        timings=Timings(
            submitted_at=_dt(submitted),
            started_at=_dt(started),
            finished_at=_dt(finished),
            queue_seconds=_seconds(submitted, started),
            run_seconds=_seconds(started, finished),
            total_seconds=_seconds(submitted, finished),
        ),
    )


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
