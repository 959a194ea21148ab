"""The worker: one member of the Kafka consumer group `llmq-workers`.

Each turn of its loop:
  1) gathers a micro-batch (up to LLMQ_BATCH_MAX_SIZE messages, or what came
     within LLMQ_BATCH_MAX_WAIT_MS of the first);
  2) sends undecodable or schema-invalid messages to the dead-letter topic;
  3) claims the rest in Redis (running), skipping any already final (cancelled,
     or finished before a redelivery);
  4) runs the claimed ones on the engine, together;
  5) writes each result (only over a non-final record, so at most once);
  6) commits each partition up to its lowest unfinished offset.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import structlog
from aiokafka import ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared.kafka import JSON_HEADERS, ensure_topics, make_consumer, make_producer, start_with_retry
from shared.keys import Keys
from shared.schema import MessageError, PromptInput, RequestMessage, Status, parse_message
from shared.settings import Settings
from shared.store import Outcome, RequestStore, base_fields, connect_redis
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
    extract_context,
    links_to,
    log_ids,
    tracer,
)
from workers.engines import Engine, EngineError, GenerationRequest, GenerationResult, load_engine
from workers.metrics import WorkerMetrics
from workers.offsets import OffsetTracker

log = structlog.get_logger(__name__)
T = TypeVar("T")

# Errors of a dependency that is down or slow, worth retrying; anything else is a bug.
TRANSIENT_ERRORS = (RedisConnectionError, RedisTimeoutError, KafkaError, OSError, TimeoutError)


@dataclass
class WorkerStats:
    fetched: int = 0
    batches: int = 0
    succeeded: int = 0
    failed: int = 0
    expired: int = 0
    skipped: int = 0  # already final when fetched (cancelled, or a redelivery)
    dead_lettered: int = 0
    results_written: int = 0

    def count_finished(self, status: Status) -> None:
        name = status.value
        setattr(self, name, getattr(self, name) + 1)


@dataclass
class Job:
    """One fetched message on its way through the worker, with its trace span."""

    record: ConsumerRecord
    message: RequestMessage | None  # None: it could not be parsed
    span: Span  # `process <topic>`, child of the producer's context
    parent: Context  # the trace context the message carried
    error: str | None = None  # why it could not be parsed
    span_ended: bool = False
    attempts: int = 0
    create_fields: dict = field(default_factory=dict)
    fetched_at: float = field(default_factory=time.time)

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


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    async def on_partitions_revoked(self, revoked):
        # Commit what is finished before another member takes these partitions.
        await self.worker._commit()
        self.worker.offsets.forget(revoked)

    async def on_partitions_assigned(self, assigned):
        log.info("partitions_assigned", partitions=sorted(f"{tp.topic}/{tp.partition}" for tp in assigned))


class Worker:
    def __init__(self, settings: Settings, engine: Engine | None = None, name: str | None = None) -> None:
        self.settings = settings
        self.engine = engine or load_engine(settings)
        self.name = name or f"{socket.gethostname()}-{os.getpid()}"
        self.stats = WorkerStats()
        self.metrics = WorkerMetrics()
        self.offsets = OffsetTracker()
        self._stopping = asyncio.Event()
        self._closed = False
        self._consumer = None
        self._producer = None
        self._redis = None
        self.store: RequestStore | None = None

    # ---- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        s = self.settings
        await self.engine.start()
        self._redis = connect_redis(s.redis_url)
        self.store = RequestStore(self._redis, Keys(s.redis_prefix), s.result_ttl_seconds)
        self._producer = make_producer(s)
        await start_with_retry(self._producer, "producer")
        await ensure_topics(s)
        self._consumer = make_consumer(s)
        self._consumer.subscribe([s.request_topic], listener=_Rebalance(self))
        await start_with_retry(self._consumer, "consumer")
        try:
            self.metrics.serve(s.metrics_port, s.http_host)
        except OSError as exc:  # e.g. several workers on one host with the same port
            log.warning("metrics_port_unavailable", port=s.metrics_port, error=str(exc))
        log.info("worker_started", worker=self.name, engine=s.engine, model=self.engine.model_name,
                 topic=s.request_topic, group=s.consumer_group)

    def stop(self) -> None:
        """Ask the loop to finish its current batch, commit and leave. Safe from a signal handler."""
        self._stopping.set()

    async def run(self) -> None:
        try:
            # A stop during start-up (joining the group can take seconds) ends it there.
            starting = asyncio.ensure_future(self.start())
            stopped = asyncio.ensure_future(self._stopping.wait())
            try:
                await asyncio.wait([starting, stopped], return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopped.cancel()
                if not starting.done():
                    starting.cancel()
                    await asyncio.gather(starting, return_exceptions=True)
            if starting.cancelled():
                log.info("worker_stopped_while_starting", worker=self.name)
                return
            starting.result()  # raises what made start fail
            while not self._stopping.is_set():
                records = await self._gather_batch()
                if records:
                    await self._process(records)
        finally:
            await self.close()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._consumer is not None:
            await self._commit()
            await self._consumer.stop()  # leaves the group: partitions move on at once
        if self._producer is not None:
            await self._producer.stop()
        if self._redis is not None:
            await self._redis.aclose()
        await self.engine.close()
        self.metrics.close()
        log.info("worker_stopped", worker=self.name, **vars(self.stats))

    # ---- the loop ------------------------------------------------------------

    async def _gather_batch(self) -> list[ConsumerRecord]:
        limit = self.settings.batch_max_size
        fetched = await self._consumer.getmany(timeout_ms=200, max_records=limit)
        records = [r for batch in fetched.values() for r in batch]
        if not records:
            return records
        deadline = time.monotonic() + self.settings.batch_max_wait_ms / 1000
        while len(records) < limit and (remaining := deadline - time.monotonic()) > 0:
            more = await self._consumer.getmany(timeout_ms=int(remaining * 1000) or 1, max_records=limit - len(records))
            if not more:
                break
            records += [r for batch in more.values() for r in batch]
        return records

    async def _process(self, records: list[ConsumerRecord]) -> None:
        self.stats.fetched += len(records)
        self.stats.batches += 1
        jobs = [self._receive(record) for record in records]
        # The batch's own span links to every request's trace (messaging conventions).
        with tracer.start_as_current_span(
            f"process batch {self.settings.request_topic}", kind=SpanKind.CONSUMER,
            links=links_to(job.parent for job in jobs),
            attributes={MESSAGING_SYSTEM: "kafka", DESTINATION: self.settings.request_topic,
                        CONSUMER_GROUP: self.settings.consumer_group, BATCH_COUNT: len(records)},
        ):
            try:
                await self._serve(jobs)
            finally:
                for job in jobs:
                    job.end_span()  # those that didn't finish (dead-lettered, skipped, or an error)
        await self._commit()

    def _receive(self, record: ConsumerRecord) -> Job:
        """Track the offset, parse the message, and open its `process` span."""
        tp = TopicPartition(record.topic, record.partition)
        self.offsets.track(tp, record.offset)
        parent = extract_context(record.headers)
        span = tracer.start_span(
            f"process {record.topic}", context=parent, kind=SpanKind.CONSUMER,
            attributes={MESSAGING_SYSTEM: "kafka", DESTINATION: record.topic, PARTITION: str(record.partition),
                        OFFSET: record.offset, CONSUMER_GROUP: self.settings.consumer_group, OPERATION_TYPE: "process"},
        )
        try:
            message = parse_message(record.value)
        except MessageError as exc:
            span.set_status(trace.StatusCode.ERROR, str(exc))
            return Job(record, None, span, parent, error=str(exc))
        submitted = message.submitted_at.timestamp() if message.submitted_at else record.timestamp / 1000
        queued_for = max(time.time() - submitted, 0.0)  # in the topic, until this fetch
        # Time in the queue is an attribute rather than a span of its own: spans
        # cost real CPU in the Python SDK (see the tracing figures in the README).
        span.set_attributes({REQUEST_ID: message.id, MESSAGE_KEY: message.id, "llmq.queue_seconds": queued_for})
        return Job(record, message, span, parent,
                   create_fields=base_fields(message.id, message, submitted, "kafka", message.tenant))

    async def _serve(self, jobs: list[Job]) -> None:
        # 2) garbage goes to the dead-letter topic
        for job in jobs:
            if job.message is None:
                await self._dead_letter(job.record, job.error)

        # 3) requests that must not run (past their deadline, or for a model we
        #    don't serve) end here; the rest are claimed
        refused: list[tuple[Job, Outcome]] = []
        to_claim: list[Job] = []
        for job in jobs:
            if job.message is None:
                continue
            outcome = self._refusal(job)
            if outcome is None:
                to_claim.append(job)
            else:
                refused.append((job, outcome))
        if refused:
            await self._finish(refused)

        verdicts = await self._retry(
            "claim", lambda: self.store.claim_many([(j.message.id, j.create_fields) for j in to_claim], self.name)
        ) if to_claim else []
        runnable = []
        for job, (verdict, attempts) in zip(to_claim, verdicts):
            if verdict == "run":
                job.attempts = attempts
                runnable.append(job)
                if self.settings.log_prompts:
                    log.info("request_started", prompt=job.message.input.model_dump(), **job.log_fields())
            else:
                self.stats.skipped += 1
                log.info("request_skipped", status=verdict, **job.log_fields())
                self.offsets.finish(job.tp, job.record.offset)

        # 4) + 5) run and write
        if runnable:
            started = time.time()
            self.metrics.batch_size.observe(len(runnable))
            self.metrics.running.set(len(runnable))
            try:
                results = await self._generate(runnable)
            finally:
                self.metrics.running.set(0)
            self._trace_generation(runnable, results, started, time.time())
            await self._finish([(job, self._outcome(job, result)) for job, result in zip(runnable, results)])
            for job, result in zip(runnable, results):
                self._observe(job, result, started)

    def _refusal(self, job: Job) -> Outcome | None:
        message = job.message
        if message.deadline is not None and message.deadline.timestamp() < time.time():
            return Outcome(message.id, Status.expired, error_type="deadline_exceeded",
                           error_message="the deadline passed before a worker started the request")
        if message.model not in (None, self.engine.model_name, self.settings.model):
            return Outcome(message.id, Status.failed, finish_reason="error", error_type="model_not_found",
                           error_message=f"model {message.model!r} is not served here (this worker serves {self.engine.model_name!r})")
        return None

    async def _generate(self, jobs: list[Job]) -> list[GenerationResult]:
        requests = [self._generation_request(job.message) for job in jobs]
        try:
            return await self.engine.generate(requests)
        except EngineError:
            raise  # the engine is dead: stop the process, nothing is committed
        except Exception:
            if len(requests) == 1:
                log.exception("request_failed_in_engine", request_id=requests[0].request_id)
                return [GenerationResult(requests[0].request_id, finish_reason="error",
                                         error="the engine failed on this request")]
            # One bad request must not fail its batch mates: run them one by one.
            log.warning("batch_failed_retrying_singly", size=len(requests))
            return [result for job in jobs for result in await self._generate([job])]

    def _trace_generation(self, jobs: list[Job], results: list[GenerationResult], start: float, end: float) -> None:
        """One GenAI span per request, under its `process` span, covering the engine call."""
        for job, result in zip(jobs, results):
            params = job.message.params
            operation = "text_completion" if isinstance(job.message.input, PromptInput) else "chat"
            span = tracer.start_span(
                f"{operation} {self.engine.model_name}", context=trace.set_span_in_context(job.span),
                start_time=int(start * 1e9), kind=SpanKind.INTERNAL,
                attributes={"gen_ai.operation.name": operation, "gen_ai.request.model": self.engine.model_name,
                            "gen_ai.request.max_tokens": params.max_tokens,
                            "gen_ai.request.temperature": params.temperature,
                            "gen_ai.response.finish_reasons": [result.finish_reason or "error"],
                            "gen_ai.usage.input_tokens": result.prompt_tokens,
                            "gen_ai.usage.output_tokens": result.completion_tokens, REQUEST_ID: job.request_id},
            )
            if result.error is not None:
                span.set_status(trace.StatusCode.ERROR, result.error)
            span.end(end_time=int(end * 1e9))

    def _observe(self, job: Job, result: GenerationResult, started: float) -> None:
        if result.error is not None:
            return
        m = self.metrics
        m.prompt_tokens.inc(result.prompt_tokens)
        m.generation_tokens.inc(result.completion_tokens)
        first = result.first_token_at
        if first is not None:
            m.time_to_first_token.observe(first - started)
            if result.completion_tokens > 1 and result.finished_at is not None:
                m.time_per_output_token.observe((result.finished_at - first) / (result.completion_tokens - 1))

    @staticmethod
    def _generation_request(message: RequestMessage) -> GenerationRequest:
        if isinstance(message.input, PromptInput):
            return GenerationRequest(message.id, message.params, prompt=message.input.prompt, adapter=message.adapter)
        return GenerationRequest(message.id, message.params, messages=message.input.messages, adapter=message.adapter)

    @staticmethod
    def _outcome(job: Job, result: GenerationResult) -> Outcome:
        if result.error is not None:
            return Outcome(job.message.id, Status.failed, finish_reason="error",
                           error_type="generation_failed", error_message=result.error)
        return Outcome(job.message.id, Status.succeeded, text=result.text, finish_reason=result.finish_reason,
                       prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens)

    async def _finish(self, finished: list[tuple[Job, Outcome]]) -> None:
        start = time.time_ns()
        written = await self._retry(
            "finish", lambda: self.store.finish_many([(o, j.create_fields) for j, o in finished])
        )
        end = time.time_ns()
        for (job, outcome), was_written in zip(finished, written):
            tracer.start_span("write result", context=trace.set_span_in_context(job.span), start_time=start,
                              attributes={REQUEST_ID: job.request_id, "llmq.result.written": was_written,
                                          "llmq.status": outcome.status.value}).end(end_time=end)
            if was_written:
                self.stats.results_written += 1
                self.stats.count_finished(outcome.status)
                self.metrics.requests.labels(outcome.status.value).inc()
                submitted = job.create_fields.get("submitted_at")
                if isinstance(submitted, float):
                    self.metrics.e2e_latency.observe(max(outcome.finished_at - submitted, 0.0))
                    self.metrics.queue_time.observe(max(job.fetched_at - submitted, 0.0))
                if job.message.reply_topic:
                    await self._reply(job)
            else:
                self.stats.skipped += 1  # cancelled while it ran, or another worker finished it first
            if outcome.status is not Status.succeeded:
                job.span.set_status(trace.StatusCode.ERROR, outcome.error_type or outcome.status.value)
            log.info("request_finished", status=outcome.status.value, written=was_written, attempts=job.attempts,
                     **job.log_fields())
            job.end_span()
            self.offsets.finish(job.tp, job.record.offset)

    async def _reply(self, job: Job) -> None:
        view = await self._retry("read_result", lambda: self.store.get(job.message.id))
        if view is not None:
            await self._retry("reply", lambda: self._producer.send_and_wait(
                job.message.reply_topic, view.model_dump_json().encode(), key=job.message.id.encode(),
                headers=JSON_HEADERS))

    async def _dead_letter(self, record: ConsumerRecord, reason: str) -> None:
        headers = list(record.headers or ()) + [
            ("llmq-dlq-reason", reason.encode()[:1024]),
            ("llmq-source", f"{record.topic}/{record.partition}/{record.offset}".encode()),
        ]
        await self._retry("dead_letter", lambda: self._producer.send_and_wait(
            self.settings.dlq_topic, record.value, key=record.key, headers=headers))
        self.stats.dead_lettered += 1
        self.metrics.dead_lettered.inc()
        log.warning("message_dead_lettered", partition=record.partition, offset=record.offset, reason=reason)
        self.offsets.finish(TopicPartition(record.topic, record.partition), record.offset)

    async def _commit(self) -> None:
        offsets = self.offsets.committable()
        if not offsets or self._consumer is None:
            return
        try:
            await self._consumer.commit(offsets)
            self.offsets.committed(offsets)
        except (CommitFailedError, IllegalStateError) as exc:
            # Partitions moved to another member: it re-reads from the last commit,
            # and the final records make it skip what we finished.
            log.warning("commit_failed", error=str(exc))
        except KafkaError as exc:
            log.warning("commit_failed_will_retry", error=str(exc))

    async def _retry(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        """Retry a Redis or Kafka call with back-off until it works: results are never dropped."""
        backoff = 0.1
        while True:
            try:
                return await call()
            except TRANSIENT_ERRORS as exc:
                if self._stopping.is_set() and backoff >= 5:
                    raise  # shutting down: leave it uncommitted for the next worker
                log.warning("dependency_error_retrying", operation=what, error=str(exc), retry_in=backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
