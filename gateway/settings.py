"""The gateway's settings (`LLMQ_*`), beside what every process reads."""

from __future__ import annotations


from pydantic import Field, SecretStr

from shared.settings import ServiceSettings, cli


class GatewaySettings(ServiceSettings):
    http_host: str = Field(default="127.0.0.1", json_schema_extra=cli("--host"))
    http_port: int = Field(default=8000, ge=0, le=65535, json_schema_extra=cli("--port"))
    # Largest accepted HTTP request body, bytes (413 above it).
    max_body_bytes: int = Field(default=1_048_576, ge=1024)
    # Cap on GET ?wait= and POST `Prefer: wait=` seconds.
    max_wait_seconds: float = Field(default=60.0, ge=0)
    # Longest a non-streamed OpenAI call (or a stream) waits for its request to end;
    # then the request is cancelled and the client gets a 504 `timeout`.
    completion_timeout_seconds: float = Field(default=600.0, gt=0)

    # Require `Authorization: Bearer <key>` on /v1 (keys: `llmq keys create NAME`). `llmq up` turns it off.
    auth: bool = True
    # Requests per second each API key may submit (token bucket in Redis; 0: no limit; needs auth).
    rate_limit_rps: float = Field(default=50.0, ge=0)
    # How many submits a key may make at once above its rate.
    rate_limit_burst: int = Field(default=100, ge=1)

    # Queue admission: refuse submits (429 queue_full) while the workers' lag is at or
    # above this many requests (0: no bound). The gateway reads the lag once a second.
    max_queue_depth: int = Field(default=0, ge=0)
    # How long an `Idempotency-Key` on POST /v1/requests answers with the request it first admitted.
    idempotency_window_seconds: int = Field(default=86_400, ge=1)

    # --- files and batches (OpenAI's /v1/files and /v1/batches) ---------------------------
    # Largest file accepted by POST /v1/files, bytes (413 above it); OpenAI's batch limit.
    max_file_bytes: int = Field(default=200 * 1024 * 1024, ge=1)
    # Most lines in one batch's input file (the batch fails validation above it); OpenAI's limit.
    batch_max_lines: int = Field(default=50_000, ge=1)
    # Lines a gateway records and produces before it waits for the broker's acks and saves
    # its place: what a batch holds in memory at once, and what a takeover may produce twice.
    batch_enqueue_chunk: int = Field(default=500, ge=1)
    # How often each gateway looks for batches to validate, enqueue, finalize, cancel or expire.
    batch_poll_seconds: float = Field(default=0.5, gt=0)
    # How long a gateway's claim on a batch lasts unless renewed; a dead gateway's batch is
    # taken over by another this long after it stopped renewing.
    batch_lease_seconds: float = Field(default=30.0, gt=0)
    # While interactive requests are in flight on a gateway, the most of its event loop's time
    # the batch work it runs may take (it rests after each slice of lines); 1: no resting.
    batch_busy_share: float = Field(default=0.2, gt=0, le=1)
    # How long a batch stays readable in Redis after it is created, and again after it ends.
    # Files are kept until deleted, as OpenAI keeps them.
    batch_ttl_seconds: int = Field(default=30 * 86_400, ge=1)

    # --- webhooks -------------------------------------------------------------
    # Run a webhook sender in this gateway (consumer group LLMQ_WEBHOOK_CONSUMER_GROUP, shared
    # by every gateway); off: another process delivers them, or none are delivered.
    webhook_sender: bool = True
    # Consumer group of the webhook senders.
    webhook_consumer_group: str = "llmq-webhooks"
    # Allow webhook URLs on loopback, private and link-local addresses (local development only: SSRF).
    webhook_allow_private: bool = False
    # Signing secret (whsec_...) with auth off; unset: one made once, kept in Redis. With auth on, each key has its own.
    webhook_secret: SecretStr | None = None
    # How long a delivery is retried after its event (exponential back-off), before it goes to the dead-letter topic.
    webhook_retry_seconds: float = Field(default=3_600.0, ge=0)
    # First pause between attempts; it doubles each time (with jitter) up to LLMQ_WEBHOOK_BACKOFF_MAX_SECONDS.
    webhook_backoff_seconds: float = Field(default=1.0, gt=0)
    # Longest pause between two attempts of one delivery.
    webhook_backoff_max_seconds: float = Field(default=300.0, gt=0)
    # Longest one delivery attempt may take (connect to the end of the answer).
    webhook_timeout_seconds: float = Field(default=10.0, gt=0)
    # Most deliveries in flight at once per sender (one at a time per request, in order).
    webhook_concurrency: int = Field(default=64, ge=1)
    # Most events a sender holds undelivered (waiting for their request's turn or a retry); it pauses its fetch there.
    webhook_max_pending: int = Field(default=10_000, ge=1)
