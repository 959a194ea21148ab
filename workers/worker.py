"""The worker: one member of the Kafka consumer group `llmq-workers`.

It owns the lifecycle and the fetch loop. The loop takes messages while the
worker holds fewer than its limit (LLMQ_MAX_IN_FLIGHT) and pauses its
partitions while it is full. It reads two lanes, the request topic and the
bulk topic, and takes bulk only as workers/lanes.py allows (interactive first,
bulk on a bounded share, a guard against starvation). What it fetches goes
through its collaborators, one per concurrent activity:
  - intake (intake.py): dead-letter, refuse, claim, hand to the runner;
  - runner (runner.py): one task per request over the engine;
  - results (results.py): batched result writes, replies, commits;
  - webhooks (webhooks.py): the webhook events of requests that ask for them;
  - cancels (cancels.py): a client's DELETE aborts the running request.
On SIGTERM it stops fetching, lets running requests finish within
LLMQ_DRAIN_SECONDS, hands back the rest uncommitted, and leaves the group.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time

import structlog
from aiokafka import ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.errors import IllegalStateError

from shared.kafka import (
    ensure_topics,
    make_consumer,
    make_producer,
    shorten_prefetch_backoff,
    start_with_retry,
)
from shared.keys import Keys
from shared.offsets import OffsetTracker
from shared.schema import Lane
from shared.store import RequestStore, connect_redis
from shared.store.cache import ResultCache
from shared.store.models import ServedModels
from shared.telemetry import NO_TRACING, Tracing
from workers.cancels import CancelListener
from workers.capacity import Capacity
from workers.engines import Engine, load_engine
from workers.intake import Intake
from workers.lanes import LANES, LanePolicy, lane_of
from workers.metrics import WorkerMetrics, WorkerStats
from workers.progress import ProgressWriter
from workers.results import ResultWriter
from workers.retry import retry
from workers.runner import Runner
from workers.settings import WorkerSettings
from workers.webhooks import WebhookQueue

log = structlog.get_logger(__name__)


def worker_name() -> str:
    """This process's name in logs, records and the claim's owner: host and pid."""
    return f"{socket.gethostname()}-{os.getpid()}"


class Worker:
    def __init__(self, settings: WorkerSettings, engine: Engine | None = None, name: str | None = None,
                 tracing: Tracing = NO_TRACING) -> None:
        self.settings = settings
        self.engine = engine or load_engine(settings)
        self.name = name or worker_name()
        self.tracing = tracing
        self.metrics = WorkerMetrics()
        self.capacity = Capacity(settings.max_in_flight or 2 * self.engine.max_running,
                                 lambda lane, held: self.metrics.in_flight.labels(lane).set(held))
        self.lane_policy = LanePolicy.of(self.capacity.limit, settings.bulk_max_share, settings.bulk_min_in_flight)
        self.offsets = OffsetTracker()
        self.consumer = None
        self.producer = None
        self.redis = None
        # Built in start(), once the clients exist.
        self.results: ResultWriter | None = None
        self.runner: Runner | None = None
        self.intake: Intake | None = None
        self._stopping = asyncio.Event()
        self._closed = False
        self._paused = False
        self._background: list[asyncio.Task] = []  # result writer, cancel listener, lease keeper

    @property
    def stats(self) -> WorkerStats:
        return self.metrics.stats

    def assignment(self) -> set[TopicPartition]:
        """The partitions this worker holds now (none before it has joined the group)."""
        return self.consumer.assignment() if self.consumer is not None else set()

    # ---- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        s = self.settings
        started = time.perf_counter()
        await self.engine.start()
        # The model load is most of a worker's start (bench/scaler.py reads this line).
        log.info("engine_started", worker=self.name, engine=s.engine, seconds=round(time.perf_counter() - started, 2))
        self.redis = connect_redis(s.redis_url)
        store = RequestStore(self.redis, Keys.of(s))
        self.producer = make_producer(s)
        await start_with_retry(self.producer, "producer")
        await ensure_topics(s)
        self.consumer = make_consumer(s, max_poll_records=s.fetch_max_records, fetch_max_wait_ms=s.fetch_max_wait_ms,
                                      session_timeout_ms=s.session_timeout_ms,
                                      heartbeat_interval_ms=max(s.session_timeout_ms // 4, 250))
        cache = ResultCache(self.redis, store.keys, s.cache_max_entries, s.cache_max_entry_bytes) \
            if s.cache_ttl_seconds else None
        webhooks = WebhookQueue(s, store, self.producer, self.metrics, self._stopping)
        self.results = ResultWriter(store, self.producer, self.consumer, self.offsets, self.capacity, self.metrics,
                                    self.tracing, self._stopping, webhooks, cache)
        progress = ProgressWriter(store, self.name, s.stream_interval_ms / 1000)
        self.runner = Runner(s, self.name, store, self.engine, self.results, progress, self.metrics, self.tracing,
                             self.stop, bulk_guard=self.lane_policy.bulk_min)
        # What `model` may name: the engine's name, or (a model engine's) the path or hub name it loaded.
        names = [self.engine.model_name] + ([s.model] if s.engine != "echo" and s.model != self.engine.model_name else [])
        await retry("register_models", lambda: ServedModels(self.redis, store.keys).register(names, s.engine),
                    self._stopping)
        served_models = (None, *names)
        self.intake = Intake(s, self.name, served_models, store, self.producer, self.offsets, self.runner,
                             self.results, self.metrics, self.tracing, self._stopping, webhooks)
        cancels = CancelListener(self.redis, store.keys.cancel_channel, self.runner)
        self.consumer.subscribe(s.lane_topics, listener=_Rebalance(self))
        await start_with_retry(self.consumer, "consumer")
        # The interactive lane is fetched at once even while bulk records wait in the fetcher:
        # see shared/kafka.py.
        shorten_prefetch_backoff(self.consumer)
        self._background = [asyncio.create_task(self.results.run(), name="llmq-result-writer"),
                            asyncio.create_task(progress.run(), name="llmq-progress-writer"),
                            asyncio.create_task(cancels.run(), name="llmq-cancel-listener"),
                            asyncio.create_task(self.runner.keep_leases(), name="llmq-lease-keeper")]
        for task in self._background:
            task.add_done_callback(self._background_ended)
        try:
            self.metrics.serve(s.metrics_port, s.metrics_host)
        except OSError as exc:  # e.g. several workers on one host with the same port
            log.warning("metrics_port_unavailable", worker=self.name, host=s.metrics_host, port=s.metrics_port,
                        error=str(exc))
        log.info("worker_started", worker=self.name, engine=s.engine, model=self.engine.model_name,
                 topic=s.request_topic, bulk_topic=s.bulk_topic_name, group=s.consumer_group,
                 max_in_flight=self.capacity.limit, bulk_max=self.lane_policy.bulk_max,
                 bulk_min=self.lane_policy.bulk_min)

    def _background_ended(self, task: asyncio.Task) -> None:
        """A loop the worker cannot serve without ended on an error it could not retry:
        say so and stop (drain), so the orchestrator starts a healthy worker."""
        if task.cancelled() or task.exception() is None:
            return
        log.error("worker_loop_failed", worker=self.name, loop=task.get_name(), error=repr(task.exception()))
        self.stop()

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
            await self.runner.drain(self.settings.drain_seconds)
            await self.results.flushed()  # every result that was produced is written
            if self.runner.fatal is not None:
                raise self.runner.fatal
        finally:
            await self.close()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.intake is not None:
            await self.intake.close()
        if self.runner is not None:
            await self.runner.close()
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self.consumer is not None:
            await self.results.commit()
            await self.consumer.stop()  # leaves the group: partitions move on at once
        if self.producer is not None:
            await self.producer.stop()
        if self.redis is not None:
            await self.redis.aclose()
        await self.engine.close()
        self.metrics.close()
        log.info("worker_stopped", worker=self.name, **vars(self.stats))

    # ---- fetching, with back-pressure and lanes ------------------------------

    async def _fetch(self) -> None:
        if self.capacity.free <= 0:
            if not self._paused:
                # Stop fetching: what stays in Kafka is for whichever worker has room.
                self.consumer.pause(*self.consumer.assignment())
                self._paused = True
            if not await self.capacity.wait_for_room(timeout=1.0):
                # A poll with everything paused returns nothing, but tells the
                # group this member is alive (max_poll_interval_ms).
                await self.consumer.getmany(timeout_ms=0, max_records=1)
            return
        if self._paused:
            self.consumer.resume(*self.consumer.paused())
            self._paused = False
        # 1) what each lane may take now (workers/lanes.py)
        self.capacity.given_back.clear()
        lanes = self._lane_partitions()
        room = self.lane_policy.room(self.capacity.free, self.capacity.held_by["bulk"],
                                     await self._waiting(lanes["interactive"]), await self._waiting(lanes["bulk"]))
        wanted = [(lane, tps, getattr(room, lane)) for lane, tps in lanes.items() if tps and getattr(room, lane) > 0]
        # 2) what the fetcher holds already, lane by lane; else wait on every lane that may
        # take some, for at most as many as the smallest of them may (the next turn takes the rest)
        records = []
        for _, tps, most in wanted:
            records += await self._take(tps, 0, most)
        if not records and wanted:
            # A lane held back by its bound (bulk at its share, say) may take more as soon as
            # a place is given back: then the wait ends there, not at its timeout.
            held_back = len(wanted) < sum(1 for tps in lanes.values() if tps)
            records = await self._wait_for_records({tp for _, tps, _ in wanted for tp in tps},
                                                   min(m for *_, m in wanted), held_back)
        elif not wanted:
            # Nothing here this worker may take (bulk at its share, no interactive partition
            # assigned): a poll with everything paused tells the group it is alive.
            self.consumer.pause(*self.consumer.assignment())
            self._paused = True
            await self.consumer.getmany(timeout_ms=200, max_records=1)
        if records and self._stopping.is_set():
            # Stopped while the fetch was in flight: start nothing new. Untracked, these
            # offsets stay uncommitted, and the group's next owner reads them again.
            log.info("fetched_while_stopping", handed_back=len(records))
            return
        if records:
            for lane in LANES:
                count = sum(1 for r in records if lane_of(r.topic, self.settings) == lane)
                if count:
                    self.capacity.take(count, lane)
                    self.metrics.count_fetched(lane, count)
            self.stats.peak_in_flight = max(self.stats.peak_in_flight, self.capacity.held)
            await self.intake.accept(records)

    def _lane_partitions(self) -> dict[Lane, set[TopicPartition]]:
        assigned = self.consumer.assignment()
        return {lane: {tp for tp in assigned if lane_of(tp.topic, self.settings) == lane} for lane in LANES}

    async def _waiting(self, partitions: set[TopicPartition]) -> bool:
        """Whether these partitions hold records this worker has not taken yet: its position
        is behind the high watermark the last fetch reported (none reported yet: maybe)."""
        for tp in partitions:
            highwater = self.consumer.highwater(tp)
            if highwater is None:
                return True
            try:
                if await self.consumer.position(tp) < highwater:
                    return True
            except IllegalStateError:  # revoked in a rebalance meanwhile: the next turn sees the new assignment
                return True
        return False

    async def _wait_for_records(self, partitions: set[TopicPartition], most: int,
                                held_back: bool) -> list[ConsumerRecord]:
        """Up to `most` records from these partitions, waiting at most 200 ms for some; with
        a lane `held_back`, no longer than until a place is given back (looked at every
        20 ms: a getmany cancelled mid-wait would leave aiokafka's poll bookkeeping off)."""
        if not held_back:
            return await self._take(partitions, 200, most)
        deadline = time.monotonic() + 0.2
        while True:
            records = await self._take(partitions, 20, most)
            if records or self.capacity.given_back.is_set() or time.monotonic() >= deadline:
                return records

    async def _take(self, partitions, timeout_ms: int, most: int) -> list[ConsumerRecord]:
        # Lanes are kept apart by naming partitions, not by pausing the bulk ones: a paused
        # partition's high watermark goes stale, and the guard must see whether bulk has work.
        # Named always: getmany() with none named reads every partition.
        fetched = await self.consumer.getmany(*partitions, timeout_ms=timeout_ms, max_records=most)
        return [r for batch in fetched.values() for r in batch]


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    async def on_partitions_revoked(self, revoked):
        # Commit what is finished before another member takes these partitions.
        await self.worker.results.commit()
        self.worker.offsets.forget(revoked)

    async def on_partitions_assigned(self, assigned):
        if self.worker._paused:  # full: new partitions wait too
            self.worker.consumer.pause(*assigned)
        log.info("partitions_assigned", partitions=sorted(f"{tp.topic}/{tp.partition}" for tp in assigned))
