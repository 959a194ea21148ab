"""Every Redis key and channel llmq uses, and how long each lives, in one place.

- `{prefix}:req:{id}`: a request record, one hash, expiring `result_ttl_seconds`
  (LLMQ_RESULT_TTL_SECONDS, default 24 h) after its last change.
- `{prefix}:stream:{id}`: a request's token stream (a Redis Stream of
  deltas, then an entry marking its end), created only once a client
  watches the request (SSE), capped at `stream_max_entries` entries and
  expiring `stream_ttl_seconds` after its last entry.
- `{prefix}:wake:{gateway}`: a gateway's wake-up stream (one entry), which
  ends its blocking read of the token streams when a client starts
  watching; expires 10 minutes after its last use.
- `{prefix}:done`: channel announcing each finished request (message: the id),
  so long-polls wake without busy polling; `{prefix}:cancelled` announces
  cancelled ones, so the worker running one stops it.
- `{prefix}:apikeys`: hash of API keys (SHA-256 of the key -> its name and
  creation time); no expiry. Each gateway caches a lookup for
  `API_KEY_CACHE_SECONDS`, so a revoked key stops working within that long.
- `{prefix}:ratelimit:{name}`: each key's rate-limit token bucket, expiring
  once it would be full again (`rate_limit_ttl`).
- `{prefix}:models`: hash of the model names workers serve (name -> engine and
  when a worker last registered it); no expiry, so it outlives a scale to zero.
  Each gateway re-reads it at most every `SERVED_MODELS_CACHE_SECONDS`.
- `{prefix}:idem:{name}:{sha256 of the Idempotency-Key}`: hash of the request id
  a client's `Idempotency-Key` admitted and its body's fingerprint, expiring
  `idempotency_window_seconds` (LLMQ_IDEMPOTENCY_WINDOW_SECONDS, default 24 h)
  after it was first used; `name` is the API key's name, empty with auth off.
- `{prefix}:cache:{name}` and `{prefix}:cache-expiry:{name}`: an API key's result
  cache (shared/store/cache.py): a hash of cached answers by entry key, and a
  sorted set of the same entry keys scored by when each expires,
  `cache_ttl_seconds` (LLMQ_CACHE_TTL_SECONDS, default 1 h) after it was
  stored; both expire that long after the key's newest entry. `name` as above.
- `{prefix}:batch:{id}`: a batch (OpenAI's Batch API), one hash: its status,
  timestamps, line count, enqueue cursor and finished-line counters (the
  workers' finish script and the cancel script increment them, so counting
  never scans line records). Expires `batch_ttl_seconds`
  (LLMQ_BATCH_TTL_SECONDS, default 30 days) after its creation and again
  after it ends. A batch's lines are request records `{prefix}:req:{batch
  id}-{line}`, holding the name of this hash in their `batch_counts` field.
- `{prefix}:batches-of:{name}`: sorted set of a key's batch ids by creation time
  (for listing), with the batches' TTL, refreshed on each create.
- `{prefix}:batches:active`: sorted set of the batches some gateway still has
  work on (validate, enqueue, finalize, cancel, expire), scored by creation
  time; no expiry (ids leave it when their batch ends).
- `{prefix}:batch-lease:{id}`: the gateway working on a batch (its name), with
  a `batch_lease_seconds` expiry it renews while working, so one gateway at a
  time works on a batch and another takes over when it dies.
- `{prefix}:whsecret:{name}`: the webhook signing secret of API key `name` (empty:
  the deployment's, with auth off), made on first use; no expiry (revoking the
  key deletes it). Each gateway caches it for `API_KEY_CACHE_SECONDS`.
- A request record also holds its webhook's delivery state (`webhook_*` fields),
  written only while the record exists, so it lives and expires with it (a write
  renews the record's TTL). So does a batch's hash, for the batch's webhook (with
  `webhook_start_queued`, set once its `start` event is on the topic): a write
  there leaves the hash's own TTL as it is (`webhook_holder`).
- `{prefix}:ftjob:{id}`: a fine-tuning job, one hash: its spec, status, owner
  trainer and lease, progress, eval figures and error. Expires
  `training_ttl_seconds` (LLMQ_TRAINING_TTL_SECONDS, default 30 days) after its
  last status change; `{prefix}:ftjob-events:{id}` (a list of its events, oldest
  first) and `{prefix}:ftjob-checkpoints:{id}` (a list of its checkpoints) live as
  long. `{prefix}:ftjobs-of:{name}`: sorted set of a key's job ids by creation time.
  Optimization jobs (`optjob-...` ids) are held the same way, in the same hashes
  and lists (`{prefix}:ftjob:optjob-...`: the trainers' claim, lease and end scripts
  work on both), listed apart in `{prefix}:optjobs-of:{name}`.
- `{prefix}:finetuned`: hash of published fine-tuned models (served name -> owner
  key, base model, method, job); no expiry (a model outlives its job's record).
- `{prefix}:trainable`: hash of the base models trainers train (name -> when first
  registered), like `{prefix}:models`; no expiry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

API_KEY_CACHE_SECONDS = 5.0
SERVED_MODELS_CACHE_SECONDS = 5.0


@dataclass(frozen=True)
class Keys:
    prefix: str = "llmq"
    result_ttl_seconds: int = 86_400
    stream_ttl_seconds: int = 3_600
    stream_max_entries: int = 4_096
    cache_ttl_seconds: int = 3_600

    @classmethod
    def of(cls, settings) -> Keys:
        """The keys and lifetimes a process's settings (shared.settings.ServiceSettings) name."""
        return cls(settings.redis_prefix, settings.result_ttl_seconds, settings.stream_ttl_seconds,
                   settings.stream_max_entries, settings.cache_ttl_seconds)

    def request(self, request_id: str) -> str:
        return f"{self.prefix}:req:{request_id}"

    def stream(self, request_id: str) -> str:
        return f"{self.prefix}:stream:{request_id}"

    def gateway_wake(self, gateway: str) -> str:
        return f"{self.prefix}:wake:{gateway}"

    @property
    def done_channel(self) -> str:
        return f"{self.prefix}:done"

    @property
    def cancel_channel(self) -> str:
        return f"{self.prefix}:cancelled"

    @property
    def api_keys(self) -> str:
        return f"{self.prefix}:apikeys"

    @property
    def models(self) -> str:
        return f"{self.prefix}:models"

    def rate_limit(self, tenant: str) -> str:
        return f"{self.prefix}:ratelimit:{tenant}"

    def idempotency(self, tenant: str, key_hash: str) -> str:
        return f"{self.prefix}:idem:{tenant}:{key_hash}"

    def cache_entries(self, tenant: str) -> str:
        return f"{self.prefix}:cache:{tenant}"

    def cache_expiries(self, tenant: str) -> str:
        return f"{self.prefix}:cache-expiry:{tenant}"

    def batch(self, batch_id: str) -> str:
        return f"{self.prefix}:batch:{batch_id}"

    def batches_of(self, tenant: str) -> str:
        return f"{self.prefix}:batches-of:{tenant}"

    @property
    def active_batches(self) -> str:
        return f"{self.prefix}:batches:active"

    def batch_lease(self, batch_id: str) -> str:
        return f"{self.prefix}:batch-lease:{batch_id}"

    @staticmethod
    def batch_line(batch_id: str, line: int) -> str:
        """The request id of a batch's line (0-based): deterministic, so a resumed enqueue
        finds the records it created before."""
        return f"{batch_id}-{line}"

    def training_job(self, job_id: str) -> str:
        return f"{self.prefix}:ftjob:{job_id}"

    def training_events(self, job_id: str) -> str:
        return f"{self.prefix}:ftjob-events:{job_id}"

    def training_checkpoints(self, job_id: str) -> str:
        return f"{self.prefix}:ftjob-checkpoints:{job_id}"

    def training_jobs_of(self, tenant: str) -> str:
        return f"{self.prefix}:ftjobs-of:{tenant}"

    def optimization_jobs_of(self, tenant: str) -> str:
        return f"{self.prefix}:optjobs-of:{tenant}"

    @property
    def fine_tuned_models(self) -> str:
        return f"{self.prefix}:finetuned"

    @property
    def trainable_models(self) -> str:
        return f"{self.prefix}:trainable"

    def webhook_secret(self, tenant: str) -> str:
        return f"{self.prefix}:whsecret:{tenant}"

    def webhook_holder(self, subject: str, subject_id: str) -> tuple[str, int]:
        """The hash that holds a webhook subject's delivery state (`webhook_*` fields),
        and the TTL a write there renews: a request record's, or 0 for a batch's hash,
        which keeps the one it has (its batch's end set it)."""
        if subject == "batch":
            return self.batch(subject_id), 0
        return self.request(subject_id), self.result_ttl_seconds

    @staticmethod
    def rate_limit_ttl(rate: float, burst: int) -> int:
        """Seconds until an emptied bucket is full again; an unused bucket is dropped then."""
        return math.ceil(burst / rate) + 1 if rate > 0 else 1
