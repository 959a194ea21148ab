"""Prometheus metrics of the gateway, in a registry of its own (one per app,
so tests can run several gateways in one process)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

from shared.metrics import ServedMetrics


class GatewayMetrics(ServedMetrics):
    """Served by the gateway's own HTTP server at /metrics."""

    def __init__(self) -> None:
        super().__init__()
        self.http_requests = Counter(
            "llmq_gateway_http_requests_total", "HTTP requests answered, by endpoint, method and status code.",
            ["endpoint", "method", "code"], registry=self.registry,
        )
        self.http_duration = Histogram(
            "llmq_gateway_http_request_duration_seconds", "Time to answer an HTTP request.",
            ["endpoint", "method"], registry=self.registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.cache_lookups = Counter(
            "llmq_gateway_cache_lookups_total", "Submits by what the result cache did: hit (answered from it), "
            "miss, bypass (Cache-Control: no-cache or no-store), uncacheable (sampled without a seed).",
            ["result"], registry=self.registry,
        )
        self.enqueued = Counter(
            "llmq_gateway_requests_enqueued_total", "Generation requests acknowledged by the broker.",
            registry=self.registry,
        )
        self.batch_lines_enqueued = Counter(
            "llmq_gateway_batch_lines_enqueued_total", "Batch lines produced to the bulk lane and acknowledged.",
            registry=self.registry,
        )
        self.batches_ended = Counter(
            "llmq_gateway_batches_ended_total", "Batches this gateway moved to an end, by how they ended.",
            ["status"], registry=self.registry,
        )
        self.webhook_deliveries = Counter(
            "llmq_webhook_deliveries_total", "Webhook events by outcome: delivered, failed_attempt (retried), "
            "given_up (to the dead-letter topic), skipped (delivered or given up before).",
            ["outcome"], registry=self.registry,
        )
        self.webhook_attempt_duration = Histogram(
            "llmq_webhook_attempt_duration_seconds", "Time of one delivery attempt, to the receiver's answer.",
            registry=self.registry, buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.webhook_lag = Histogram(
            "llmq_webhook_lag_seconds", "From the event (a request started or finished) to its delivery.",
            registry=self.registry, buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600),
        )
