"""The worker's side of webhooks: a request that asked for them gets its `start`
event queued once this worker has claimed it, and its `completed` event once its
result is written, or once a redelivered message finds it final (this worker, or
one before it, may have died between the two), on the webhooks topic that the
gateways' senders deliver from."""

from __future__ import annotations

import asyncio

import structlog
from aiokafka import AIOKafkaProducer

from shared.store import RequestStore
from shared.webhooks import WebhookEvents
from workers.job import Job
from workers.metrics import WorkerMetrics
from workers.retry import retry
from workers.settings import WorkerSettings

log = structlog.get_logger(__name__)


class WebhookQueue:
    def __init__(self, settings: WorkerSettings, store: RequestStore, producer: AIOKafkaProducer,
                 metrics: WorkerMetrics, stopping: asyncio.Event) -> None:
        self.store = store
        self.events = WebhookEvents(producer, settings.webhook_topic, settings.webhook_max_payload_bytes)
        self.metrics = metrics
        self.stopping = stopping

    async def emit(self, kind: str, job: Job) -> None:
        """Queue event `kind` of the job's request, if its webhook asked for it. A failure
        is logged and counted, never the request's: its result stands whatever its webhook."""
        message = job.message
        if message is None or kind not in message.webhook_events:
            return
        try:
            view = await retry("read_record", lambda: self.store.get(message.id), self.stopping)
            if view is None:  # expired
                return
            await retry("webhook_event", lambda: self.events.emit(kind, view), self.stopping)
        except Exception as exc:  # noqa: BLE001 - the request goes on without its event
            self.metrics.webhook_events.labels(kind, "failed").inc()
            log.warning("webhook_event_failed", webhook_event=kind, error=f"{type(exc).__name__}: {exc}",
                        **job.log_fields())
            return
        self.metrics.webhook_events.labels(kind, "queued").inc()
