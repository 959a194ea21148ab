"""One fetched Kafka message on its way through a worker, with its trace span."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from aiokafka import ConsumerRecord, TopicPartition
from opentelemetry.context import Context
from opentelemetry.trace import Span

from shared.schema import Lane, RequestMessage
from shared.telemetry import log_ids


@dataclass
class Job:
    record: ConsumerRecord
    message: RequestMessage | None  # None: it could not be parsed
    span: Span  # `process <topic>`, child of the producer's context
    parent: Context  # the trace context the message carried
    error: str | None = None  # why it could not be parsed
    span_ended: bool = False
    attempts: int = 0
    cancelled: bool = False  # a client cancelled it while it ran
    create_fields: dict = field(default_factory=dict)  # the record to create if the message came straight from Kafka
    fetched_at: float = field(default_factory=time.time)
    lane: Lane = "interactive"  # the topic it came from: the request topic or the bulk topic
    guarded: bool = False  # a bulk request within the starvation guard's minimum (workers/lanes.py)

    @property
    def tp(self) -> TopicPartition:
        return TopicPartition(self.record.topic, self.record.partition)

    @property
    def request_id(self) -> str:
        return self.message.id if self.message else ""

    def log_fields(self) -> dict[str, str]:
        return {"request_id": self.request_id, **log_ids(self.span)}

    def end_span(self) -> None:
        if not self.span_ended:  # the SDK warns on a second end()
            self.span_ended = True
            self.span.end()
