"""What happens to fetched messages before they run. Each group of them:
  1) goes to the dead-letter topic if undecodable or schema-invalid;
  2) ends at once if it must not run (over the deployment's limits, deadline
     passed, another model), or if it was started too often already (a poison
     message: dead-lettered);
  3) is claimed in Redis (running, under this worker's lease), skipping any
     already final (cancelled, or finished before a redelivery); one whose
     claim another live worker holds waits, uncommitted, for that run to end or
     its lease to lapse;
  4) is handed to the runner, after its `start` webhook event is queued (if it
     asked for one).
"""

from __future__ import annotations

import asyncio
import json
import time

import structlog
from aiokafka import AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from shared.offsets import OffsetTracker
from shared.schema import MessageError, Status, parse_message
from shared.store import RequestStore, base_fields
from shared.telemetry import (
    BATCH_COUNT,
    CONSUMER_GROUP,
    DESTINATION,
    MESSAGE_KEY,
    MESSAGING_SYSTEM,
    OFFSET,
    OPERATION_TYPE,
    PARTITION,
    REQUEST_ID,
    Tracing,
)
from workers.job import Job
from workers.lanes import lane_of
from workers.metrics import WorkerMetrics
from workers.outcome import Outcome
from workers.results import ResultWriter
from workers.retry import is_transient, retry
from workers.runner import Runner
from workers.settings import WorkerSettings
from workers.webhooks import WebhookQueue

log = structlog.get_logger(__name__)


class Intake:
    def __init__(self, settings: WorkerSettings, worker_name: str, served_models: tuple[str | None, ...],
                 store: RequestStore, producer: AIOKafkaProducer, offsets: OffsetTracker, runner: Runner,
                 results: ResultWriter, metrics: WorkerMetrics, tracing: Tracing, stopping: asyncio.Event,
                 webhooks: WebhookQueue) -> None:
        self.settings = settings
        self.webhooks = webhooks
        self.worker_name = worker_name
        self.served_models = served_models  # what `model` may name here (None: whatever is served)
        self.store = store
        self.producer = producer
        self.offsets = offsets
        self.runner = runner
        self.results = results
        self.metrics = metrics
        self.tracing = tracing
        self.stopping = stopping
        self._awaiting: set[asyncio.Task] = set()  # requests whose claim another worker holds

    async def accept(self, records: list[ConsumerRecord]) -> None:
        jobs = [self._receive(record) for record in records]
        # The fetch's own span links to every request's trace (messaging conventions), when
        # it is sampled; the spans under each request name their parent themselves.
        topic = self.settings.request_topic
        span = self.tracing.start_span(
            f"process batch {topic}", kind=SpanKind.CONSUMER,
            attributes={MESSAGING_SYSTEM: "kafka", DESTINATION: topic, CONSUMER_GROUP: self.settings.consumer_group,
                        BATCH_COUNT: len(records)},
        )
        self.tracing.link(span, (job.parent for job in jobs))
        try:
            await self._admit(jobs)
        finally:
            span.end()

    def _receive(self, record: ConsumerRecord) -> Job:
        """Track the offset, parse the message, and open its `process` span."""
        self.offsets.track(TopicPartition(record.topic, record.partition), record.offset)
        lane = lane_of(record.topic, self.settings)
        parent = self.tracing.message_context(record.headers)
        span = self.tracing.start_span(
            f"process {record.topic}", context=parent, kind=SpanKind.CONSUMER,
            attributes={MESSAGING_SYSTEM: "kafka", DESTINATION: record.topic, PARTITION: str(record.partition),
                        OFFSET: record.offset, CONSUMER_GROUP: self.settings.consumer_group,
                        OPERATION_TYPE: "process"},
        )
        try:
            message = parse_message(record.value)
        except MessageError as exc:
            span.set_status(trace.StatusCode.ERROR, str(exc))
            return Job(record, None, span, parent, error=str(exc), lane=lane)
        submitted = message.submitted_at.timestamp() if message.submitted_at else record.timestamp / 1000
        if span.is_recording():  # not sampled: no attributes to build
            # Time in the queue (until this fetch) is an attribute rather than a span of its
            # own: each span costs CPU in the Python SDK.
            span.set_attributes({REQUEST_ID: message.id, MESSAGE_KEY: message.id,
                                 "llmq.queue_seconds": max(time.time() - submitted, 0.0)})
        return Job(record, message, span, parent, lane=lane,
                   create_fields=base_fields(message.id, message, submitted, "kafka", message.tenant, lane))

    async def _admit(self, jobs: list[Job]) -> None:
        # 1) garbage goes to the dead-letter topic
        for job in jobs:
            if job.message is None:
                await self._dead_letter(job, job.error)

        # 2) requests that must not run end here; the rest are claimed
        to_claim: list[Job] = []
        for job in jobs:
            if job.message is None:
                continue
            outcome = self._refusal(job)
            if outcome is None:
                to_claim.append(job)
            else:
                self.results.put(job, outcome)
        if not to_claim:
            return

        # 3) claim; 4) start each on the engine, once the `start` webhook events of those
        #    that asked are queued (together: each waits for the broker's ack)
        claimed = list(zip(to_claim, await self._claim(to_claim)))
        await asyncio.gather(*(self.webhooks.emit("start", job) for job, (verdict, attempts) in claimed
                               if verdict == "run" and attempts <= self.settings.max_attempts))
        for job, (verdict, attempts) in claimed:
            await self._after_claim(job, verdict, attempts, start_queued=True)

    async def close(self) -> None:
        for task in self._awaiting:
            task.cancel()
        await asyncio.gather(*self._awaiting, return_exceptions=True)

    async def _claim(self, jobs: list[Job]) -> list[tuple[str, int]]:
        return await retry("claim", lambda: self.store.claim_many(
            [(job.message.id, job.create_fields) for job in jobs], self.worker_name,
            self.settings.claim_lease_seconds), self.stopping)

    async def _after_claim(self, job: Job, verdict: str, attempts: int, start_queued: bool = False) -> None:
        job.attempts = attempts
        if verdict == "run":
            if attempts > self.settings.max_attempts:
                await self._give_up(job)
            else:
                if not start_queued:
                    await self.webhooks.emit("start", job)  # queued before its `completed` can be
                self.runner.start(job)
        elif verdict == "leased":
            task = asyncio.create_task(self._await_lease(job), name=f"llmq-leased-{job.request_id}")
            self._awaiting.add(task)
            task.add_done_callback(self._awaiting.discard)
        else:
            self.metrics.stats.skipped += 1
            log.info("request_skipped", status=verdict, **job.log_fields())
            # Final already: its `completed` event may not have been queued (a worker died
            # between the result and the event; the sender delivers one event once).
            await self.webhooks.emit("completed", job)
            self.results.done(job)

    async def _await_lease(self, job: Job) -> None:
        """Another worker that is alive runs this request (its message came again: a
        rebalance, or a duplicate produce). Hold it, uncommitted, until that run ends
        (then skip it) or its lease lapses (its worker died: run it here)."""
        log.info("request_leased_elsewhere", **job.log_fields())
        try:
            while True:
                await asyncio.sleep(min(1.0, self.settings.claim_lease_seconds / 4))
                if self.stopping.is_set():
                    self.results.hand_back(job)
                    return
                [(verdict, attempts)] = await self._claim([job])
                if verdict != "leased":
                    await self._after_claim(job, verdict, attempts)
                    return
        except asyncio.CancelledError:
            self.results.hand_back(job)
            raise

    def _refusal(self, job: Job) -> Outcome | None:
        """How the request ends without running (over the deployment's limits, past its
        deadline, or for a model not served here), or None: it runs."""
        message = job.message
        over = message.over_limits(self.settings.max_prompt_chars, self.settings.max_tokens_limit)
        if over is not None:  # produced straight to Kafka past what the gateway would take
            return Outcome(message.id, Status.failed, finish_reason="error", error_type=over.type,
                           error_message=over.message)
        if message.deadline is not None and message.deadline.timestamp() < time.time():
            return Outcome(message.id, Status.expired, error_type="deadline_exceeded",
                           error_message="the deadline passed before a worker started the request")
        if message.model not in self.served_models:
            return Outcome(message.id, Status.failed, finish_reason="error", error_type="model_not_found",
                           error_message=f"model {message.model!r} is not served here "
                                         f"(this worker serves {self.runner.engine.model_name!r})")
        return None

    async def _give_up(self, job: Job) -> None:
        """A message whose every earlier attempt died with its worker: dead-letter it and fail it."""
        reason = (f"started {job.attempts - 1} times without finishing (a worker died each time); "
                  f"the limit is LLMQ_MAX_ATTEMPTS={self.settings.max_attempts}")
        await self._dead_letter(job, reason, finish_offset=False)
        self.results.put(job, Outcome(job.message.id, Status.failed, finish_reason="error",
                                      error_type="too_many_attempts", error_message=reason))

    async def _dead_letter(self, job: Job, reason: str, finish_offset: bool = True) -> None:
        """The message, as it came, to the dead-letter topic with the reason. One the topic
        refuses for good (too large, say) is logged with why and passed over: the loop goes on."""
        record = job.record
        headers = list(record.headers or ()) + [
            ("llmq-dlq-reason", reason.encode()[:1024]),
            ("llmq-source", f"{record.topic}/{record.partition}/{record.offset}".encode()),
        ]
        try:
            await retry("dead_letter", lambda: self.producer.send_and_wait(
                self.settings.dlq_topic, record.value, key=record.key, headers=headers), self.stopping)
        except KafkaError as exc:
            if is_transient(exc):
                raise  # stopping with the broker away: leave it uncommitted for the next worker
            self.metrics.count_dead_letter_failed()
            log.error("dead_letter_failed", partition=record.partition, offset=record.offset, reason=reason,
                      key=_printable(record.key), error=f"{type(exc).__name__}: {exc}", **_ids(job))
        else:
            self.metrics.count_dead_lettered()
            log.warning("message_dead_lettered", partition=record.partition, offset=record.offset, reason=reason,
                        key=_printable(record.key), **_ids(job))
        if finish_offset:
            self.results.done(job)


def _printable(key: bytes | None) -> str | None:
    """A message key for a log line: the text it is, or its bytes' repr when it is not UTF-8."""
    if key is None:
        return None
    try:
        return key.decode()
    except UnicodeDecodeError:
        return repr(key)


def _ids(job: Job) -> dict[str, str]:
    """The job's log ids; for a message that did not parse, the `id` it names, if it names one."""
    fields = job.log_fields()
    if job.message is None:
        try:
            named = json.loads(job.record.value).get("id")
        except (TypeError, ValueError, AttributeError):
            named = None
        fields["request_id"] = named if isinstance(named, str) else None
    return fields
