"""The request record in Redis: create, claim, progress, finish, cancel, read."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import redis.asyncio as aioredis

from shared.keys import Keys
from shared.schema import RequestView
from shared.store.fields import flat
from shared.store.pipelining import AutoPipeline, run_script_batch
from shared.store.scripts import ADMIT, CANCEL, CLAIM, FINISH, PROGRESS, RENEW, WEBHOOK_STATE
from shared.store.view import view_of


@dataclass(frozen=True)
class IdempotencyClaim:
    """A client's Idempotency-Key on a create, and the fingerprint of the body it came with."""

    key: str
    fingerprint: str
    window_seconds: int

    @property
    def key_hash(self) -> str:
        # Hashed: a client's key may be long or private; stored keys have one fixed shape.
        return hashlib.sha256(self.key.encode("utf-8", "surrogateescape")).hexdigest()


@dataclass(frozen=True)
class Admission:
    """What a create did: 'created', or why not: 'rate_limited' (see `retry_after`),
    'id_in_use', or the idempotency key was seen before: 'replay' (same body) or
    'key_reused' (another body), with the id it first admitted in `request_id`."""

    outcome: str
    retry_after: float = 0.0
    request_id: str | None = None


class RequestStore:
    def __init__(self, redis: aioredis.Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        self.ttl_seconds = keys.result_ttl_seconds
        self._claim = redis.register_script(CLAIM)
        self._finish = redis.register_script(FINISH)
        self._cancel = redis.register_script(CANCEL)
        self._admit = redis.register_script(ADMIT)
        self._renew = redis.register_script(RENEW)
        self._progress = redis.register_script(PROGRESS)
        self._webhook_state = redis.register_script(WEBHOOK_STATE)
        self._admissions = AutoPipeline(self._admit)

    async def create(self, fields: Mapping[str, object], rate: float = 0.0, burst: int = 1,
                     idempotency: IdempotencyClaim | None = None) -> Admission:
        """Create a new record, in one script: unless `idempotency`'s key was seen
        before, after taking a token from its tenant's bucket when `rate` > 0, and
        only if no record has its id. Nothing is created unless it says 'created'."""
        request_id, tenant = str(fields["id"]), str(fields.get("tenant") or "")
        keys = [self.keys.rate_limit(tenant), self.keys.request(request_id)]
        args = [rate, burst, self.ttl_seconds, flat(fields), self.keys.rate_limit_ttl(rate, burst), request_id]
        if idempotency is not None:
            keys.append(self.keys.idempotency(tenant, idempotency.key_hash))
            args += [idempotency.fingerprint, idempotency.window_seconds]
        outcome, *detail = await self._admissions.call(keys, args)
        if outcome == "rate_limited":
            return Admission(outcome, retry_after=float(detail[0]))
        return Admission(outcome, request_id=detail[0] if detail else None)

    async def release_idempotency(self, tenant: str | None, idempotency: IdempotencyClaim) -> None:
        """Forget a key's claim, so that the client's retry with it is admitted anew."""
        await self.redis.delete(self.keys.idempotency(tenant or "", idempotency.key_hash))

    async def claim_many(
        self, claims: Iterable[tuple[str, Mapping[str, object]]], worker: str, lease_seconds: float
    ) -> list[tuple[str, int]]:
        """Mark each (id, create-fields) running under `worker`'s lease. Returns (verdict,
        attempts) per id, in order: 'run'; 'leased' while another live claim holds it;
        or the final status."""
        now = str(time.time())
        calls = [([self.keys.request(request_id)], [now, worker, self.ttl_seconds, flat(create), lease_seconds])
                 for request_id, create in claims]
        return [(verdict, int(attempts)) for verdict, attempts in await run_script_batch(self._claim, calls)]

    async def renew_leases(self, request_ids: Iterable[str], worker: str, lease_seconds: float) -> list[bool]:
        """Extend `worker`'s lease on each running claim (0 s: let it lapse now). True where held."""
        calls = [([self.keys.request(request_id)], [worker, lease_seconds]) for request_id in request_ids]
        return [bool(held) for held in await run_script_batch(self._renew, calls)] if calls else []

    async def progress_many(self, deltas: Iterable[tuple[str, str]], worker: str) -> list[bool]:
        """Append each (id, text delta) to its record's text so far, and to its token
        stream if a client watches it, where `worker` still holds the running claim."""
        k = self.keys
        calls = [([k.request(request_id), k.stream(request_id)], [worker, delta, k.stream_max_entries,
                                                                  k.stream_ttl_seconds])
                 for request_id, delta in deltas]
        return [bool(held) for held in await run_script_batch(self._progress, calls)] if calls else []

    async def finish_many(
        self, finishes: Iterable[tuple[str, Mapping[str, object], Mapping[str, object]]]
    ) -> list[bool]:
        """Write each (id, result fields, create-fields) unless its record is already
        final. True where written."""
        k = self.keys
        calls = [([k.request(request_id), k.done_channel, k.stream(request_id)],
                  [self.ttl_seconds, flat(result), flat(create), request_id, k.stream_max_entries,
                   k.stream_ttl_seconds])
                 for request_id, result, create in finishes]
        return [bool(written) for written in await run_script_batch(self._finish, calls)]

    async def cancel(self, request_id: str) -> str | None:
        k = self.keys
        keys = [k.request(request_id), k.done_channel, k.cancel_channel, k.stream(request_id)]
        return await self._cancel(keys=keys, args=[time.time(), self.ttl_seconds, request_id, k.stream_max_entries,
                                                   k.stream_ttl_seconds])

    # The webhook delivery state is written on the hash of the event's subject (a request
    # record, or a batch's hash): `key` and `ttl` as Keys.webhook_holder names them.

    async def webhook_state(self, key: str, event_type: str) -> str | None:
        """How the subject's `event_type` event ended: 'delivered', 'given_up', or None (not yet)."""
        return await self.redis.hget(key, f"webhook_{event_type}")

    async def record_webhook(self, key: str, ttl: int, fields: Mapping[str, object], attempts: int = 0) -> bool:
        """Write webhook delivery state (`webhook_*` fields) and count `attempts`, if the hash
        still exists. True where written."""
        written = await self._webhook_state(keys=[key], args=[ttl, flat(fields), attempts, "", ""])
        return written is not None

    async def webhook_first_attempt(self, key: str, ttl: int, event_type: str, now: float) -> float:
        """When the first attempt to deliver the event was made: `now`, unless a sender (this
        one, or one before a restart) recorded an earlier one; its retry window starts there."""
        kept = await self._webhook_state(keys=[key], args=[ttl, "[]", 0, f"webhook_{event_type}_since", now])
        return float(kept) if kept is not None else now

    async def get(self, request_id: str) -> RequestView | None:
        record = await self.redis.hgetall(self.keys.request(request_id))
        return view_of(record) if record else None
