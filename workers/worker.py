"""The worker: one member of the Kafka consumer group `llmq-workers`.

Its fetch loop takes messages while it holds fewer than its limit
(LLMQ_MAX_IN_FLIGHT) and pauses its partitions while it is full. Each group of
fetched messages:
  1) goes through the dead-letter topic if undecodable or schema-invalid;
  2) ends at once if it must not run (deadline passed, another model), or if
     it was started too often already (a poison message: dead-lettered);
  3) is claimed in Redis (running), skipping any already final (cancelled,
     or finished before a redelivery);
  4) runs on the engine, each request on its own: the engine batches per
     decoding step, so a short request never waits for a long one.
As each request finishes, its result is written (only over a non-final
record, so at most once; finishes that arrive together share one Redis round
trip) and each partition is committed up to its lowest unfinished offset.
A DELETE of a running request reaches the worker on a Redis channel and
aborts it in the engine.
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
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared.kafka import JSON_HEADERS, ensure_topics, make_consumer, make_producer, start_with_retry
from shared.keys import Keys
from shared.schema import MessageError, PromptInput, RequestMessage, Status, parse_message
from shared.settings import Settings
from shared.store import RequestStore, base_fields, connect_redis
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
    tracing_configured,
)
from workers.engines import Engine, EngineError, GenerationRequest, GenerationResult, load_engine
from workers.metrics import WorkerMetrics
from workers.offsets import OffsetTracker
from workers.outcome import Outcome

log = structlog.get_logger(__name__)
T = TypeVar("T")
_NO_CONTEXT = Context()

# Errors of a dependency that is down or slow, worth retrying; anything else is a bug.
TRANSIENT_ERRORS = (RedisConnectionError, RedisTimeoutError, KafkaError, OSError, TimeoutError)
# Longest pause between retries: a retry is one cheap call, and a longer pause
# is added to every result's latency after Redis comes back (bench/chaos.py).
RETRY_MAX_SECONDS = 1.0


@dataclass
class WorkerStats:
    fetched: int = 0
    succeeded: int = 0
    failed: int = 0
    expired: int = 0
    skipped: int = 0  # already final when fetched (cancelled, or a redelivery)
    aborted: int = 0  # stopped in the engine: cancelled by a client, or handed back on shutdown
    dead_lettered: int = 0
    results_written: int = 0
    peak_in_flight: int = 0  # most requests held at once (never above the limit)

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
    cancelled: bool = False  # a client cancelled it while it ran
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
        if self.worker._paused:  # full: new partitions wait too
            self.worker._consumer.pause(*assigned)
        log.info("partitions_assigned", partitions=sorted(f"{tp.topic}/{tp.partition}" for tp in assigned))


class Worker:
    def __init__(self, settings: Settings, engine: Engine | None = None, name: str | None = None) -> None:
        self.settings = settings
        self.engine = engine or load_engine(settings)
        self.name = name or f"{socket.gethostname()}-{os.getpid()}"
        self.max_in_flight = settings.max_in_flight or 2 * self.engine.max_running
        self.stats = WorkerStats()
        self.metrics = WorkerMetrics()
        self.offsets = OffsetTracker()
        self._stopping = asyncio.Event()
        self._closed = False
        self._consumer = None
        self._producer = None
        self._redis = None
        self.store: RequestStore | None = None
        self._paused = False
        self._in_flight = 0  # fetched and not yet finished
        self._room = asyncio.Event()  # set when _in_flight drops below the limit
        self._running: dict[str, Job] = {}  # in the engine, by request id
        self._tasks: set[asyncio.Task] = set()  # one per running request
        self._finished: asyncio.Queue[tuple[Job, Outcome]] = asyncio.Queue()
        self._background: list[asyncio.Task] = []  # result writer, cancel listener
        self._fatal: EngineError | None = None
        self._tracing = tracing_configured()  # off: no span work at all on the hot path

    # ---- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        s = self.settings
        await self.engine.start()
        self._redis = connect_redis(s.redis_url)
        self.store = RequestStore(self._redis, Keys(s.redis_prefix, s.result_ttl_seconds))
        self._producer = make_producer(s)
        await start_with_retry(self._producer, "producer")
        await ensure_topics(s)
        self._consumer = make_consumer(s)
        self._consumer.subscribe([s.request_topic], listener=_Rebalance(self))
        await start_with_retry(self._consumer, "consumer")
        self._background = [asyncio.create_task(self._write_results(), name="llmq-result-writer"),
                            asyncio.create_task(self._listen_for_cancels(), name="llmq-cancel-listener")]
        try:
            self.metrics.serve(s.metrics_port, s.http_host)
        except OSError as exc:  # e.g. several workers on one host with the same port
            log.warning("metrics_port_unavailable", port=s.metrics_port, error=str(exc))
        log.info("worker_started", worker=self.name, engine=s.engine, model=self.engine.model_name,
                 topic=s.request_topic, group=s.consumer_group, max_in_flight=self.max_in_flight)

    def stop(self) -> None:
        """Ask the worker to drain and leave. Safe from a signal handler."""
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
                await self._fetch()
            await self._drain()
            if self._fatal is not None:
                raise self._fatal
        finally:
            await self.close()

    async def _drain(self) -> None:
        """Stop fetching, let running requests finish within the grace period, hand back the rest."""
        if self._tasks and self._fatal is None:
            log.info("worker_draining", running=len(self._tasks), grace_seconds=self.settings.drain_seconds)
            await asyncio.wait(self._tasks, timeout=self.settings.drain_seconds)
        for request_id in list(self._running):
            await self.engine.abort(request_id)  # handed back: no result, offset left uncommitted
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._finished.join()  # every result that was produced is written

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for task in self._tasks | set(self._background):
            task.cancel()
        await asyncio.gather(*self._tasks, *self._background, return_exceptions=True)
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

    # ---- fetching, with back-pressure ----------------------------------------

    async def _fetch(self) -> None:
        room = self.max_in_flight - self._in_flight
        if room <= 0:
            if not self._paused:
                # Stop fetching: what stays in Kafka is for whichever worker has room.
                self._consumer.pause(*self._consumer.assignment())
                self._paused = True
            self._room.clear()
            try:
                await asyncio.wait_for(self._room.wait(), timeout=1.0)
            except TimeoutError:
                # A poll with everything paused returns nothing, but tells the
                # group this member is alive (max_poll_interval_ms).
                await self._consumer.getmany(timeout_ms=0, max_records=1)
            return
        if self._paused:
            self._consumer.resume(*self._consumer.paused())
            self._paused = False
        fetched = await self._consumer.getmany(timeout_ms=200, max_records=room)
        records = [r for batch in fetched.values() for r in batch]
        if records:
            await self._accept(records)

    async def _accept(self, records: list[ConsumerRecord]) -> None:
        self.stats.fetched += len(records)
        self._in_flight += len(records)
        self.stats.peak_in_flight = max(self.stats.peak_in_flight, self._in_flight)
        jobs = [self._receive(record) for record in records]
        if not self._tracing:
            await self._admit(jobs)
            return
        # The fetch's own span links to every request's trace (messaging conventions).
        # start_span, not start_as_current_span: no context to attach; the spans under
        # each request name their parent themselves.
        span = tracer.start_span(
            f"process batch {self.settings.request_topic}", kind=SpanKind.CONSUMER,
            links=links_to(job.parent for job in jobs),
            attributes={MESSAGING_SYSTEM: "kafka", DESTINATION: self.settings.request_topic,
                        CONSUMER_GROUP: self.settings.consumer_group, BATCH_COUNT: len(records)},
        )
        try:
            await self._admit(jobs)
        finally:
            span.end()

    def _receive(self, record: ConsumerRecord) -> Job:
        """Track the offset, parse the message, and open its `process` span."""
        tp = TopicPartition(record.topic, record.partition)
        self.offsets.track(tp, record.offset)
        if self._tracing:
            parent = extract_context(record.headers)
            span = tracer.start_span(
                f"process {record.topic}", context=parent, kind=SpanKind.CONSUMER,
                attributes={MESSAGING_SYSTEM: "kafka", DESTINATION: record.topic, PARTITION: str(record.partition),
                            OFFSET: record.offset, CONSUMER_GROUP: self.settings.consumer_group,
                            OPERATION_TYPE: "process"},
            )
        else:  # no header parsing or span objects on the hot path when nothing is exported
            parent, span = _NO_CONTEXT, trace.INVALID_SPAN
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

    async def _admit(self, jobs: list[Job]) -> None:
        # 1) garbage goes to the dead-letter topic
        for job in jobs:
            if job.message is None:
                await self._dead_letter(job, job.error)

        # 2) requests that must not run (past their deadline, or for a model we
        #    don't serve) end here; the rest are claimed
        to_claim: list[Job] = []
        for job in jobs:
            if job.message is None:
                continue
            outcome = self._refusal(job)
            if outcome is None:
                to_claim.append(job)
            else:
                self._finished.put_nowait((job, outcome))
        if not to_claim:
            return

        # 3) claim; 4) start each on the engine
        verdicts = await self._retry(
            "claim", lambda: self.store.claim_many([(j.message.id, j.create_fields) for j in to_claim], self.name))
        for job, (verdict, attempts) in zip(to_claim, verdicts):
            job.attempts = attempts
            if verdict != "run":
                self.stats.skipped += 1
                log.info("request_skipped", status=verdict, **job.log_fields())
                self._done(job)
            elif attempts > self.settings.max_attempts:
                await self._give_up(job)
            else:
                if self.settings.log_prompts:
                    log.info("request_started", prompt=job.message.input.model_dump(), **job.log_fields())
                task = asyncio.create_task(self._generate(job), name=f"llmq-request-{job.request_id}")
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    def _refusal(self, job: Job) -> Outcome | None:
        message = job.message
        if message.deadline is not None and message.deadline.timestamp() < time.time():
            return Outcome(message.id, Status.expired, error_type="deadline_exceeded",
                           error_message="the deadline passed before a worker started the request")
        if message.model not in (None, self.engine.model_name, self.settings.model):
            return Outcome(message.id, Status.failed, finish_reason="error", error_type="model_not_found",
                           error_message=f"model {message.model!r} is not served here (this worker serves {self.engine.model_name!r})")
        return None

    async def _give_up(self, job: Job) -> None:
        """A message whose every earlier attempt died with its worker: dead-letter it and fail it."""
        reason = (f"started {job.attempts - 1} times without finishing (a worker died each time); "
                  f"the limit is LLMQ_MAX_ATTEMPTS={self.settings.max_attempts}")
        await self._dead_letter(job, reason, finish_offset=False)
        self._finished.put_nowait((job, Outcome(job.message.id, Status.failed, finish_reason="error",
                                                error_type="too_many_attempts", error_message=reason)))

    # ---- running a request -----------------------------------------------------

    async def _generate(self, job: Job) -> None:
        request = self._generation_request(job)
        started = time.time()
        self._running[job.request_id] = job
        self._update_gauges()
        self.metrics.batch_size.observe(len(self._running))
        result: GenerationResult | None = None
        try:
            # Deltas are read as they come (a later streaming API publishes them);
            # the last output carries the result.
            async for output in self.engine.generate(request):
                result = output.result
        except EngineError as exc:
            self._fatal = exc  # the engine is dead: stop the process, leave this uncommitted
            log.error("engine_died", error=str(exc), **job.log_fields())
            self.stop()
            return
        except Exception:
            log.exception("request_failed_in_engine", **job.log_fields())
            result = GenerationResult(job.request_id, finish_reason="error", error="the engine failed on this request")
        finally:
            self._running.pop(job.request_id, None)
            self._update_gauges()
        if result is None:
            result = GenerationResult(job.request_id, finish_reason="error", error="the engine returned no result")
        self._trace_generation(job, result, started, time.time())
        if result.finish_reason == "abort":
            self.stats.aborted += 1
            if job.cancelled:  # the record is final already: nothing to write
                log.info("request_aborted", reason="cancelled", **job.log_fields())
                self._done(job)
            else:  # shutting down: another worker runs it again
                log.info("request_handed_back", **job.log_fields())
                job.end_span()
                self._release()
            return
        self._observe(result, started)
        self._finished.put_nowait((job, self._outcome(job, result)))

    def _update_gauges(self) -> None:
        # The engine says how many of the requests it holds are in its running
        # batch; the rest wait there for a slot.
        running = min(self.engine.running, len(self._running))
        self.metrics.running.set(running)
        self.metrics.waiting.set(len(self._running) - running)

    def _generation_request(self, job: Job) -> GenerationRequest:
        message = job.message
        trace_headers: dict[str, str] = {}
        if self._tracing:
            propagate.inject(trace_headers, context=trace.set_span_in_context(job.span))
        prompt, messages = (message.input.prompt, None) if isinstance(message.input, PromptInput) \
            else (None, message.input.messages)
        return GenerationRequest(message.id, message.params, prompt=prompt, messages=messages,
                                 adapter=message.adapter, priority=message.priority or 0, trace_headers=trace_headers)

    def _trace_generation(self, job: Job, result: GenerationResult, start: float, end: float) -> None:
        """One GenAI span per request, under its `process` span, covering its time in the engine."""
        if not job.span.is_recording():  # not sampled (or tracing off): its children wouldn't be either
            return
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

    def _observe(self, result: GenerationResult, started: float) -> None:
        if result.error is not None:
            return
        m = self.metrics
        m.prompt_tokens.inc(result.prompt_tokens)
        m.generation_tokens.inc(result.completion_tokens)
        first = result.first_token_at
        if first is not None:
            m.time_to_first_token.observe(max(first - started, 0.0))
            if result.completion_tokens > 1 and result.finished_at is not None:
                m.time_per_output_token.observe((result.finished_at - first) / (result.completion_tokens - 1))

    @staticmethod
    def _outcome(job: Job, result: GenerationResult) -> Outcome:
        if result.error is not None:
            return Outcome(job.message.id, Status.failed, finish_reason="error",
                           error_type="generation_failed", error_message=result.error)
        return Outcome(job.message.id, Status.succeeded, text=result.text, finish_reason=result.finish_reason,
                       prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens)

    # ---- cancels -----------------------------------------------------------------

    async def _listen_for_cancels(self) -> None:
        """Abort requests this worker is running when a client cancels them."""
        backoff = 0.1
        while True:
            try:
                async with self._redis.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(self.store.keys.cancel_channel)
                    backoff = 0.1
                    async for message in pubsub.listen():
                        job = self._running.get(message["data"].decode() if isinstance(message["data"], bytes)
                                                else str(message["data"]))
                        if job is not None:
                            job.cancelled = True
                            await self.engine.abort(job.request_id)
            except TRANSIENT_ERRORS as exc:
                # A cancel missed while Redis is down only costs the work: the
                # finished result is not written over the cancelled record.
                log.warning("cancel_listener_reconnecting", error=str(exc), retry_in=backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, RETRY_MAX_SECONDS)

    # ---- results and offsets -------------------------------------------------------

    async def _write_results(self) -> None:
        """Write finished requests' results; those that finish together share one round trip."""
        while True:
            finished = [await self._finished.get()]
            while not self._finished.empty():
                finished.append(self._finished.get_nowait())
            try:
                await self._finish(finished)
                await self._commit()
            except Exception:  # noqa: BLE001 - the writer must outlive any one failure
                # Unwritten results stay uncommitted, so their requests run again elsewhere.
                log.exception("result_write_failed", count=len(finished))
            finally:
                for _ in finished:
                    self._finished.task_done()

    async def _finish(self, finished: list[tuple[Job, Outcome]]) -> None:
        start = time.time_ns()
        written = await self._retry(
            "finish", lambda: self.store.finish_many([(o.request_id, o.fields(), j.create_fields) for j, o in finished])
        )
        end = time.time_ns()
        for (job, outcome), was_written in zip(finished, written):
            if job.span.is_recording():
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
            self._done(job)

    def _done(self, job: Job) -> None:
        """The request needs nothing more from this worker: its offset may be committed."""
        job.end_span()
        self.offsets.finish(job.tp, job.record.offset)
        self._release()

    def _release(self) -> None:
        self._in_flight -= 1
        if self._in_flight < self.max_in_flight:
            self._room.set()

    async def _reply(self, job: Job) -> None:
        view = await self._retry("read_result", lambda: self.store.get(job.message.id))
        if view is not None:
            await self._retry("reply", lambda: self._producer.send_and_wait(
                job.message.reply_topic, view.model_dump_json().encode(), key=job.message.id.encode(),
                headers=JSON_HEADERS))

    async def _dead_letter(self, job: Job, reason: str, finish_offset: bool = True) -> None:
        record = job.record
        headers = list(record.headers or ()) + [
            ("llmq-dlq-reason", reason.encode()[:1024]),
            ("llmq-source", f"{record.topic}/{record.partition}/{record.offset}".encode()),
        ]
        await self._retry("dead_letter", lambda: self._producer.send_and_wait(
            self.settings.dlq_topic, record.value, key=record.key, headers=headers))
        self.stats.dead_lettered += 1
        self.metrics.dead_lettered.inc()
        log.warning("message_dead_lettered", partition=record.partition, offset=record.offset, reason=reason,
                    **job.log_fields())
        if finish_offset:
            self._done(job)

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
        backoff, tries = 0.1, 0
        while True:
            try:
                return await call()
            except TRANSIENT_ERRORS as exc:
                tries += 1
                if self._stopping.is_set() and tries > 8:  # about 5 s of retries
                    raise  # shutting down: leave it uncommitted for the next worker
                log.warning("dependency_error_retrying", operation=what, error=str(exc), retry_in=backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, RETRY_MAX_SECONDS)
