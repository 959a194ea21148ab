"""The trainer: one member of the Kafka consumer group `llmq-trainers`, running
fine-tuning and optimization jobs from the fine-tuning topic one at a time (a message's
`kind` tells them apart; both go through the same flow, below).

For each job message it claims the job in Redis (a lease it renews while it
trains, so only one trainer trains a job at a time), runs the training in a
thread (workers/training/run.py), and meanwhile writes the run's progress,
events and checkpoints to the job's record from the event loop, renewing the
lease with each write and reading whether a cancel was asked for. It ends the
job (only while it still holds it) and publishes the output, then commits the
message. A trainer that dies leaves the message uncommitted and the lease to
lapse: the next trainer the message reaches resumes the job from its last
checkpoint. On SIGTERM it stops the run at its next step (checkpoint saved),
lets the lease go and leaves the message for another trainer.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog
from aiokafka import TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError
from redis.exceptions import RedisError

from shared.kafka import ensure_topics, make_consumer, start_with_retry
from shared.keys import Keys
from shared.store import connect_redis
from shared.store.fine_tuning import Claim, TrainingStore
from shared.telemetry import NO_TRACING, Tracing
from shared.optimization import OptimizationMessage, parse_job_message, root_model
from shared.training import JobStatus, MessageError, TrainingMessage, split_fine_tuned
from workers.optimize.run import run_optimization
from workers.retry import retry
from workers.training.metrics import TrainerMetrics
from workers.training.run import Hooks, JobResult, remove_work_dir, run_job
from workers.training.settings import TrainerSettings

log = structlog.get_logger(__name__)

# A trainer holds one job for hours without asking Kafka for more: the group must not
# count that as a hung consumer (aiokafka rejoins rebalances in the background meanwhile).
MAX_POLL_INTERVAL_MS = 7 * 86_400 * 1000
# Most events kept while Redis is away (the oldest are dropped past it; progress keeps only its latest).
MAX_PENDING_EVENTS = 1_000

JobMessage = TrainingMessage | OptimizationMessage


@dataclass(frozen=True)
class JobKind:
    """What differs between the two kinds of job a trainer runs in the same flow (claim,
    lease, progress, cancel, end, publish): the run, the job field naming the output, and
    how the output is published."""

    run: Callable[[JobMessage, TrainerSettings, Hooks], JobResult]
    output_field: str  # the job's field (and the message's) holding the output's served name
    noun: str  # "fine-tuned", "optimized": in the job's events

    def output(self, message: JobMessage) -> str:
        return getattr(message, self.output_field)


FINE_TUNING = JobKind(run_job, "fine_tuned_model", "fine-tuned")
OPTIMIZATION = JobKind(run_optimization, "optimized_model", "optimized")


def kind_of(message: JobMessage) -> JobKind:
    return OPTIMIZATION if isinstance(message, OptimizationMessage) else FINE_TUNING


def base_of(message: JobMessage) -> str:
    """The base model a job needs its trainer to have."""
    return message.base_model if isinstance(message, OptimizationMessage) else message.model


def published_entry(message: JobMessage) -> dict:
    """The published model's entry (gateway/fine_tuning/serving.py routes requests by it)."""
    output = split_fine_tuned(kind_of(message).output(message))[1]
    if isinstance(message, OptimizationMessage):
        return {"tenant": message.tenant, "base": message.base_model, "source": message.model,
                "method": "optimization", "strategy": message.strategy.type, "output": output, "job": message.id}
    return {"tenant": message.tenant, "base": message.model, "method": message.method.type, "output": output,
            "job": message.id}


@dataclass
class RunningJob:
    """What the training thread and the event loop share about the job in hand."""

    message: JobMessage
    stop: threading.Event = field(default_factory=threading.Event)
    cancel_asked: bool = False
    lease_lost: bool = False
    progress: dict | None = None
    events: list[dict] = field(default_factory=list)  # TrainingStore.add_event's arguments
    checkpoints: list[dict] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def hooks(self, metrics: TrainerMetrics) -> Hooks:
        def progress(values: dict) -> None:
            metrics.progress(values)
            with self.lock:
                self.progress = dict(values)
            if values.get("train_loss") is not None:  # a step's figures are an event too, as OpenAI's `metrics` ones
                event(f"Step {values.get('step')}/{values.get('total_steps')}: training loss={values['train_loss']:.4f}",
                      "info", dict(values), "metrics")

        def event(message: str, level: str, data: dict, type_: str = "message") -> None:
            with self.lock:
                self.events.append({"message": message, "level": level, "data": data, "type_": type_})
                del self.events[:-MAX_PENDING_EVENTS]

        def checkpoint(values: dict) -> None:
            with self.lock:
                self.checkpoints.append(dict(values))

        return Hooks(progress=progress, event=event, checkpoint=checkpoint, should_stop=self.stop.is_set)

    def take(self) -> tuple[dict | None, list[dict], list[dict]]:
        with self.lock:
            taken = self.progress, self.events, self.checkpoints
            self.progress, self.events, self.checkpoints = None, [], []
        return taken

    def put_back(self, progress: dict | None, events: list, checkpoints: list) -> None:
        """What could not be written (Redis away): kept for the next turn, newer progress first."""
        with self.lock:
            self.progress = self.progress or progress
            self.events[:0] = events
            self.checkpoints[:0] = checkpoints


class TrainingWorker:
    def __init__(self, settings: TrainerSettings, name: str, tracing: Tracing = NO_TRACING) -> None:
        self.settings = settings
        self.name = name
        self.tracing = tracing
        self.metrics = TrainerMetrics()
        self.consumer = None
        self.redis = None
        self.store: TrainingStore | None = None
        # The name jobs give as `model` (the one the workers serve it under), and only that one:
        # a job naming the model's path would publish under a name no client uses.
        self.trainable = frozenset({settings.base_model_name})
        self.job: RunningJob | None = None
        self._stopping = asyncio.Event()
        self._closed = False

    def stop(self) -> None:
        """Stop after the job in hand reaches its next step. Safe from a signal handler."""
        self._stopping.set()
        if self.job is not None:
            self.job.stop.set()

    async def run(self) -> None:
        try:
            await self.start()
            while not self._stopping.is_set():
                batch = await self.consumer.getmany(timeout_ms=1000, max_records=1)
                for tp, records in batch.items():
                    for record in records:
                        if await self._handle(record):
                            await self._commit(tp, record.offset + 1)
                        else:  # handed back (stopping): fetched again by whoever holds the partition next
                            return
        finally:
            await self.close()

    async def start(self) -> None:
        s = self.settings
        self.redis = connect_redis(s.redis_url)
        self.store = TrainingStore(self.redis, Keys.of(s), s.training_ttl_seconds)
        await retry("register_trainable", lambda: self.store.register_trainable(sorted(self.trainable)),
                    self._stopping)
        await ensure_topics(s)
        self.consumer = make_consumer(s, group_id=s.trainer_group, max_poll_records=1,
                                      max_poll_interval_ms=MAX_POLL_INTERVAL_MS)
        self.consumer.subscribe([s.fine_tuning_topic])
        await start_with_retry(self.consumer, "consumer")
        try:
            self.metrics.serve(s.metrics_port, s.metrics_host)
        except OSError as exc:
            log.warning("metrics_port_unavailable", trainer=self.name, port=s.metrics_port, error=str(exc))
        log.info("trainer_started", trainer=self.name, model=s.base_model_name, topic=s.fine_tuning_topic,
                 group=s.trainer_group)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.consumer is not None:
            await self.consumer.stop()
        if self.redis is not None:
            await self.redis.aclose()
        self.metrics.close()
        log.info("trainer_stopped", trainer=self.name, **self.metrics.counts())

    # ---- one message ---------------------------------------------------------------

    async def _handle(self, record) -> bool:
        """Run the job a message carries. True: done with it (commit); False: hand it back."""
        try:
            message = parse_job_message(record.value)
        except MessageError as exc:  # not a job: nothing to run or fail; passed over with the reason
            log.error("training_message_invalid", partition=record.partition, offset=record.offset, error=str(exc))
            return True
        bound = log.bind(job_id=message.id)
        if base_of(message) not in self.trainable or root_model(message.model) != base_of(message):
            await self._end(message, None, JobStatus.failed, error=(
                "model_not_trainable", f"model {message.model!r} is not trained here "
                                       f"(this trainer trains {self.settings.base_model_name!r})"))
            return True
        attempt = await self._claim(message)
        if attempt is None:
            return False
        if attempt == Claim.ENDED:
            await self._publish_if_succeeded(message)
            bound.info("training_job_skipped", reason="already ended")
            return True
        if attempt > self.settings.max_attempts:
            await self._end(message, self.name, JobStatus.failed, error=(
                "too_many_attempts", f"started {attempt - 1} times without finishing (a trainer died each time); "
                                     f"the limit is LLMQ_MAX_ATTEMPTS={self.settings.max_attempts}"))
            return True
        with self.tracing.start_span("llmq.train", context=self.tracing.message_context(record.headers)):
            return await self._train(message, attempt)

    async def _claim(self, message: JobMessage) -> int | None:
        """The attempt number, or Claim.ENDED; while another trainer's lease on the job is live
        (it was redelivered here after a rebalance), wait for it to end or lapse. None: stopping."""
        while not self._stopping.is_set():
            attempt = await retry("claim_training", lambda: self.store.claim(
                message.id, self.name, self.settings.training_lease_seconds), self._stopping)
            if attempt != Claim.HELD:
                return attempt
            try:
                await asyncio.wait_for(self._stopping.wait(), self.settings.training_lease_seconds / 3)
            except TimeoutError:
                pass
        return None

    async def _train(self, message: JobMessage, attempt: int) -> bool:
        job = self.job = RunningJob(message)
        if self._stopping.is_set():
            job.stop.set()
        job.events.append({"message": f"Trainer {self.name} took the job (attempt {attempt})", "level": "info",
                           "data": {"attempt": attempt}})
        self.metrics.started()
        keeper = asyncio.create_task(self._keep(job), name="llmq-training-keeper")
        try:
            result = await asyncio.to_thread(kind_of(message).run, message, self.settings, job.hooks(self.metrics))
        except Exception as exc:  # a fault of the run itself, not of the job's data: fail the job, say why
            log.exception("training_crashed", job_id=message.id)
            result = JobResult("failed", "training_error", f"{type(exc).__name__}: {exc}")
        finally:
            keeper.cancel()
            await asyncio.gather(keeper, return_exceptions=True)
            self.job = None
        await self._write(job, lease_seconds=self.settings.training_lease_seconds)
        return await self._conclude(job, result)

    async def _conclude(self, job: RunningJob, result: JobResult) -> bool:
        message = job.message
        if job.lease_lost:
            log.warning("training_job_lost", job_id=message.id, detail="another trainer holds it now")
            return True
        if result.status == "succeeded":
            if await self._end(message, self.name, JobStatus.succeeded, result=result):
                await self._publish_if_succeeded(message)
            return True
        if result.status == "failed":
            await self._end(message, self.name, JobStatus.failed, result=result,
                            error=(result.error_code or "training_failed", result.error_message or ""))
            return True
        if job.cancel_asked:
            await self._end(message, self.name, JobStatus.cancelled, result=result)
            return True
        # Stopping (SIGTERM): let the lease go at once, so the next trainer resumes without waiting it out.
        await retry("release_training", lambda: self.store.renew(message.id, self.name, 0), self._stopping)
        log.info("training_job_handed_back", job_id=message.id)
        return False

    async def _end(self, message: JobMessage, trainer: str | None, status: JobStatus,
                   result: JobResult | None = None, error: tuple[str, str] | None = None) -> bool:
        kind = kind_of(message)
        fields: dict[str, object] = {}
        if result is not None:
            fields.update(trained_tokens=result.trained_tokens, eval=result.eval or None)
            if result.figures:
                fields["figures"] = result.figures
        if status is JobStatus.succeeded:
            fields[kind.output_field] = kind.output(message)
        if error is not None:
            fields["error"] = {"code": error[0], "message": error[1], "param": None}
        ended = await retry("end_training", lambda: self.store.end(message.id, trainer, status, fields),
                            self._stopping)
        if not ended:
            log.warning("training_job_not_ours", job_id=message.id, status=status.value)
            return False
        if status is JobStatus.succeeded:  # a cancelled or failed job keeps its last checkpoint
            await asyncio.to_thread(remove_work_dir, self.settings, message.id)
        text = {JobStatus.succeeded: "The job has successfully completed",
                JobStatus.cancelled: "The job was cancelled (its last checkpoint is kept)",
                JobStatus.failed: f"The job failed: {error[1] if error else ''}"}[status]
        await retry("job_event", lambda: self.store.add_event(
            message.id, text, "error" if status is JobStatus.failed else "info", data={"status": status.value}),
            self._stopping)
        self.metrics.ended(status.value)
        log.info("training_job_ended", job_id=message.id, status=status.value,
                 error=error[0] if error else None)
        return True

    async def _publish_if_succeeded(self, message: JobMessage) -> None:
        """Make a succeeded job's output routable by name (again, after a crash in between: idempotent)."""
        job = await retry("read_job", lambda: self.store.get(message.id), self._stopping)
        if job is None or job.get("status") != JobStatus.succeeded.value:
            return
        kind = kind_of(message)
        name = kind.output(message)
        entry = {**published_entry(message), "created_at": int(float(job.get("finished_at") or time.time()))}
        if await self.store.published(name) is None:
            await retry("publish_model", lambda: self.store.publish(name, entry), self._stopping)
            await self.store.add_event(message.id, f"New {kind.noun} model created: {name}",
                                       data={kind.output_field: name})

    # ---- while it trains ------------------------------------------------------------

    async def _keep(self, job: RunningJob) -> None:
        """Renew the lease and write what the run reported, every progress interval."""
        while True:
            await self._write(job, lease_seconds=self.settings.training_lease_seconds)
            await asyncio.sleep(self.settings.progress_interval_seconds)

    async def _write(self, job: RunningJob, lease_seconds: float) -> None:
        """One renewal with the latest progress, then the events and checkpoints since the last.
        Redis away: kept for the next turn, and training goes on."""
        progress, events, checkpoints = job.take()
        fields: dict[str, object] = {}
        if progress is not None:
            fields["progress"] = progress
        try:
            ours, cancel = await self.store.renew(job.message.id, self.name, lease_seconds, fields)
            while events:
                await self.store.add_event(job.message.id, **events[0])
                events.pop(0)
            while checkpoints:
                await self.store.add_checkpoint(job.message.id, checkpoints[0])
                checkpoints.pop(0)
        except (RedisError, OSError) as exc:
            job.put_back(progress, events, checkpoints)
            log.warning("training_progress_unwritten", job_id=job.message.id, error=type(exc).__name__)
            return
        if not ours:
            job.lease_lost = True
            job.stop.set()
        elif cancel and not job.cancel_asked:
            job.cancel_asked = True
            job.stop.set()
            log.info("training_cancel_asked", job_id=job.message.id)

    async def _commit(self, tp: TopicPartition, offset: int) -> None:
        try:
            await self.consumer.commit({tp: offset})
        except (CommitFailedError, IllegalStateError, KafkaError) as exc:
            # The partition moved to another trainer meanwhile: it finds the job ended and commits it.
            log.warning("training_commit_failed", partition=tp.partition, offset=offset, error=type(exc).__name__)
