"""Where a worker's requests end: their results are written to Redis (only over
a non-final record, so at most once; results that finish together share one
round trip), replies go to a `reply_topic` when the message names one, the
`completed` webhook event is queued when the request asked for one, and
each partition is committed up to its lowest unfinished offset. Succeeded
results of deterministic requests also fill the result cache, from which the
gateway answers their repeats."""

from __future__ import annotations

import asyncio
import time

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaError
from opentelemetry import trace
from redis.exceptions import RedisError

from shared.kafka import JSON_HEADERS
from shared.offsets import OffsetTracker
from shared.schema import Status
from shared.store import RequestStore
from shared.store.cache import CachedAnswer, ResultCache, cache_key
from shared.telemetry import REQUEST_ID, Tracing
from workers.capacity import Capacity
from workers.job import Job
from workers.metrics import WorkerMetrics
from workers.outcome import Outcome
from workers.retry import retry
from workers.webhooks import WebhookQueue

log = structlog.get_logger(__name__)


class ResultWriter:
    def __init__(self, store: RequestStore, producer: AIOKafkaProducer, consumer: AIOKafkaConsumer,
                 offsets: OffsetTracker, capacity: Capacity, metrics: WorkerMetrics, tracing: Tracing,
                 stopping: asyncio.Event, webhooks: WebhookQueue, cache: ResultCache | None = None) -> None:
        self.store = store
        self.webhooks = webhooks
        self.producer = producer
        self.consumer = consumer
        self.offsets = offsets
        self.capacity = capacity
        self.metrics = metrics
        self.tracing = tracing
        self.stopping = stopping
        self._finished: asyncio.Queue[tuple[Job, Outcome]] = asyncio.Queue()
        self.cache = cache
        # Chosen once: without a cache (LLMQ_CACHE_TTL_SECONDS=0) nothing is stored.
        self._fill = self._fill_cache if cache is not None else self._no_fill

    def put(self, job: Job, outcome: Outcome) -> None:
        """Queue a finished request's result for writing."""
        self._finished.put_nowait((job, outcome))

    async def flushed(self) -> None:
        """Until every result queued so far is written (or its write has failed)."""
        await self._finished.join()

    def done(self, job: Job) -> None:
        """The request needs nothing more from this worker: its offset may be committed."""
        job.end_span()
        self.offsets.finish(job.tp, job.record.offset)
        self.capacity.give_back(job.lane)

    def hand_back(self, job: Job) -> None:
        """The request is left for another worker: its offset stays uncommitted."""
        job.end_span()
        self.capacity.give_back(job.lane)

    async def run(self) -> None:
        while True:
            finished = [await self._finished.get()]
            while not self._finished.empty():
                finished.append(self._finished.get_nowait())
            try:
                await self._write(finished)
                await self.commit()
            except Exception:  # noqa: BLE001 - the writer must outlive any one failure
                # Unwritten results stay uncommitted, so their requests run again elsewhere.
                log.exception("result_write_failed", count=len(finished))
            finally:
                for _ in finished:
                    self._finished.task_done()

    async def _write(self, finished: list[tuple[Job, Outcome]]) -> None:
        # Cached before the results are written, so that a client who has read a result
        # and repeats the request finds its answer in the cache.
        await self._fill([(job, outcome) for job, outcome in finished if outcome.status is Status.succeeded])
        start = time.time_ns()
        written = await retry("finish", lambda: self.store.finish_many(
            [(outcome.request_id, outcome.fields(), job.create_fields) for job, outcome in finished]), self.stopping)
        end = time.time_ns()
        for (job, outcome), was_written in zip(finished, written):
            if job.span.is_recording():
                self.tracing.start_span(
                    "write result", context=trace.set_span_in_context(job.span), start_time=start,
                    attributes={REQUEST_ID: job.request_id, "llmq.result.written": was_written,
                                "llmq.status": outcome.status.value},
                ).end(end_time=end)
            if was_written:
                self.metrics.count_finished(outcome.status)
                submitted = job.create_fields.get("submitted_at")
                if isinstance(submitted, float):
                    self.metrics.e2e_latency.observe(max(outcome.finished_at - submitted, 0.0))
                    self.metrics.queue_time.observe(max(job.fetched_at - submitted, 0.0))
                if job.message.reply_topic:
                    await self._reply(job)
            else:
                self.metrics.stats.skipped += 1  # cancelled while it ran, or another worker finished it first
            if outcome.status is not Status.succeeded:
                job.span.set_status(trace.StatusCode.ERROR, outcome.error_type or outcome.status.value)
            error = {"error_type": outcome.error_type, "error": outcome.error_message} if outcome.error_type else {}
            log.info("request_finished", status=outcome.status.value, written=was_written, attempts=job.attempts,
                     **error, **job.log_fields())
            if not (was_written and job.message.webhook_events):
                self.done(job)
        # The `completed` events of those that asked, together, before their offsets may be
        # committed: a crash before this redelivers them, and intake queues the event of a
        # request it finds final.
        hooked = [job for (job, _), was_written in zip(finished, written) if was_written and job.message.webhook_events]
        if hooked:
            await asyncio.gather(*(self.webhooks.emit("completed", job) for job in hooked))
            for job in hooked:
                self.done(job)

    async def _fill_cache(self, succeeded: list[tuple[Job, Outcome]]) -> None:
        """Store the answers of the deterministic requests among these in the result cache.
        Best effort: a fill lost to a Redis error only means their repeats run again.
        Also where the record turns out final already (cancelled while it ran): the
        answer is as good for a repeat."""
        fills = []
        for job, outcome in succeeded:
            key = cache_key(job.message, job.message.tenant)
            if key is not None:
                fills.append((job.request_id, job.message.tenant, key, CachedAnswer(
                    outcome.text, outcome.finish_reason, outcome.prompt_tokens, outcome.completion_tokens,
                    outcome.model or job.message.model)))
        if not fills:
            return
        try:
            self.metrics.count_cached(await self.cache.fill_many(fills))
        except (RedisError, OSError) as exc:
            log.warning("cache_fill_failed", count=len(fills), error=str(exc))

    @staticmethod
    async def _no_fill(_succeeded: list[tuple[Job, Outcome]]) -> None:
        return None

    async def _reply(self, job: Job) -> None:
        """The result to the message's reply_topic. A reply the topic refuses for good (too
        large, say) is logged and counted; the result stays readable in Redis."""
        message = job.message
        view = await retry("read_result", lambda: self.store.get(message.id), self.stopping)
        if view is None:
            return
        try:
            await retry("reply", lambda: self.producer.send_and_wait(
                message.reply_topic, view.model_dump_json().encode(), key=message.id.encode(),
                headers=JSON_HEADERS), self.stopping)
        except KafkaError as exc:
            self.metrics.count_reply_failed()
            log.warning("reply_failed", topic=message.reply_topic, error=f"{type(exc).__name__}: {exc}",
                        **job.log_fields())

    async def commit(self) -> None:
        """Commit each partition up to its lowest unfinished offset."""
        await self.offsets.commit(self.consumer, "request")
