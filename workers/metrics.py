"""Prometheus metrics of a worker, named in the spirit of vLLM's
(`vllm:time_to_first_token_seconds` → `llmq_worker_time_to_first_token_seconds`),
in a registry of its own, served on LLMQ_METRICS_PORT."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from shared.metrics import ServedMetrics

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class WorkerMetrics(ServedMetrics):
    def __init__(self) -> None:
        super().__init__()
        r = self.registry
        self.requests = Counter("llmq_worker_requests_total", "Requests finished, by final status.", ["status"], registry=r)
        self.dead_lettered = Counter("llmq_worker_dead_lettered_total", "Messages sent to the dead-letter topic.", registry=r)
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
        self.prompt_tokens = Counter("llmq_worker_prompt_tokens_total", "Prompt tokens processed.", registry=r)
        self.generation_tokens = Counter("llmq_worker_generation_tokens_total", "Tokens generated.", registry=r)
        self.running = Gauge("llmq_worker_num_requests_running", "Requests in the engine's running batch now.",
                             registry=r)
        self.waiting = Gauge("llmq_worker_num_requests_waiting", "Requests handed to the engine, waiting for a slot.",
                             registry=r)
