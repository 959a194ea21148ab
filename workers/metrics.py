"""What a worker counts, in one place: Prometheus metrics named in the spirit
of vLLM's (`vllm:time_to_first_token_seconds` ->
`llmq_worker_time_to_first_token_seconds`), in a registry of its own served on
LLMQ_METRICS_PORT, and plain counts of the same events (`WorkerStats`) for
the worker's stop line and for tests."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import Counter, Gauge, Histogram

from shared.metrics import ServedMetrics
from shared.schema import Lane, Status

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


@dataclass
class WorkerStats:
    fetched: int = 0
    fetched_bulk: int = 0  # of them, from the bulk lane
    succeeded: int = 0
    failed: int = 0
    expired: int = 0
    skipped: int = 0  # already final when fetched (cancelled, or a redelivery)
    cancelled: int = 0  # cancelled by a client while it ran here
    aborted: int = 0  # stopped in the engine: cancelled by a client, or handed back on shutdown
    dead_lettered: int = 0
    dead_letter_failed: int = 0  # the dead-letter topic refused the message (e.g. too large)
    replies_failed: int = 0  # a reply_topic refused the reply (e.g. too large)
    results_written: int = 0
    cached: int = 0  # answers stored in the result cache
    peak_in_flight: int = 0  # most requests held at once (never above the limit)


class WorkerMetrics(ServedMetrics):
    def __init__(self) -> None:
        super().__init__()
        self.stats = WorkerStats()
        r = self.registry
        self.requests = Counter("llmq_worker_requests_total", "Requests finished, by final status.", ["status"], registry=r)
        self.dead_lettered = Counter("llmq_worker_dead_lettered_total", "Messages sent to the dead-letter topic.", registry=r)
        self.dead_letter_failed = Counter("llmq_worker_dead_letter_failed_total",
                                          "Messages the dead-letter topic refused (logged with the reason).",
                                          registry=r)
        self.webhook_events = Counter("llmq_worker_webhook_events_total",
                                      "Webhook events queued on the webhooks topic, by event and outcome "
                                      "(queued, failed: the broker refused it).", ["event", "outcome"], registry=r)
        self.replies_failed = Counter("llmq_worker_replies_failed_total",
                                      "Replies a reply_topic refused (the result is still in Redis).", registry=r)
        self.queue_time = Histogram("llmq_worker_request_queue_time_seconds", "Submit to start of work.",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.e2e_latency = Histogram("llmq_worker_e2e_request_latency_seconds", "Submit to result written.",
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.time_to_first_token = Histogram("llmq_worker_time_to_first_token_seconds",
                                             "Start of work to the first generated token.",
                                             buckets=LATENCY_BUCKETS, registry=r)
        self.time_per_output_token = Histogram("llmq_worker_time_per_output_token_seconds",
                                               "Time per generated token after the first.",
                                               buckets=TOKEN_BUCKETS, registry=r)
        self.batch_size = Histogram("llmq_worker_batch_size", "Requests in the engine when one more starts.",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.cache_fills = Counter("llmq_worker_cache_fills_total",
                                   "Answers of deterministic requests stored in the result cache.", registry=r)
        self.prompt_tokens = Counter("llmq_worker_prompt_tokens_total", "Prompt tokens processed.", registry=r)
        self.generation_tokens = Counter("llmq_worker_generation_tokens_total", "Tokens generated.", registry=r)
        self.running = Gauge("llmq_worker_num_requests_running", "Requests in the engine's running batch now.",
                             registry=r)
        self.waiting = Gauge("llmq_worker_num_requests_waiting", "Requests handed to the engine, waiting for a slot.",
                             registry=r)
        self.fetched = Counter("llmq_worker_fetched_total", "Request messages taken from Kafka, by lane.", ["lane"],
                               registry=r)
        self.in_flight = Gauge("llmq_worker_in_flight", "Requests held (running or waiting in the engine), by lane.",
                               ["lane"], registry=r)

    def count_fetched(self, lane: Lane, count: int) -> None:
        self.stats.fetched += count
        if lane == "bulk":
            self.stats.fetched_bulk += count
        self.fetched.labels(lane).inc(count)

    def count_finished(self, status: Status) -> None:
        """A result was written with this final status."""
        self.stats.results_written += 1
        setattr(self.stats, status.value, getattr(self.stats, status.value) + 1)
        self.requests.labels(status.value).inc()

    def count_cancelled(self) -> None:
        """A client cancelled a request this worker was running (the record was final already)."""
        self.stats.cancelled += 1
        self.requests.labels("cancelled").inc()

    def count_cached(self, count: int) -> None:
        self.stats.cached += count
        self.cache_fills.inc(count)

    def count_dead_lettered(self) -> None:
        self.stats.dead_lettered += 1
        self.dead_lettered.inc()

    def count_dead_letter_failed(self) -> None:
        self.stats.dead_letter_failed += 1
        self.dead_letter_failed.inc()

    def count_reply_failed(self) -> None:
        self.stats.replies_failed += 1
        self.replies_failed.inc()
