"""Runs each claimed request on the engine, one asyncio task per request: the
engine batches per decoding step, so a short request never waits for a long
one. A request's outcome goes to the result writer; one aborted because the
worker is stopping is handed back (left uncommitted for another worker)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import structlog
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from shared.schema import PromptInput, Status
from shared.store import RequestStore
from shared.telemetry import REQUEST_ID, Tracing
from workers.engines import Engine, EngineError, GenerationRequest, GenerationResult
from workers.job import Job
from workers.lanes import engine_priority
from workers.metrics import WorkerMetrics
from workers.outcome import Outcome
from workers.progress import ProgressWriter
from workers.results import ResultWriter
from workers.retry import is_transient
from workers.settings import WorkerSettings

log = structlog.get_logger(__name__)


class Runner:
    def __init__(self, settings: WorkerSettings, worker_name: str, store: RequestStore, engine: Engine,
                 results: ResultWriter, progress: ProgressWriter, metrics: WorkerMetrics, tracing: Tracing,
                 on_fatal: Callable[[], None], bulk_guard: int = 0) -> None:
        self.settings = settings
        self.worker_name = worker_name
        self.store = store
        self.engine = engine
        self.results = results
        self.progress = progress
        self.metrics = metrics
        self.tracing = tracing
        self.on_fatal = on_fatal  # called once the engine has died: the worker stops
        self.bulk_guard = bulk_guard  # bulk requests that queue in the engine as interactive ones (lanes.py)
        self.fatal: EngineError | None = None
        self.running: dict[str, Job] = {}  # in the engine, by request id
        self._lapsing: set[str] = set()  # handed back: their leases are let go at the next renewal
        self._guarded: set[str] = set()  # bulk requests queued as interactive ones (the starvation guard)
        self._tasks: set[asyncio.Task] = set()

    def start(self, job: Job) -> None:
        if job.lane == "bulk" and len(self._guarded) < self.bulk_guard:
            # The guard's minimum of bulk must start in the engine also under steady
            # interactive load, where a bulk request queued behind them would never start.
            job.guarded = True
            self._guarded.add(job.request_id)
        if self.settings.log_prompts:
            log.info("request_started", prompt=job.message.input.model_dump(), **job.log_fields())
        task = asyncio.create_task(self._generate(job), name=f"llmq-request-{job.request_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def cancel(self, request_id: str) -> None:
        """A client cancelled the request: stop it in the engine (its record is final already)."""
        job = self.running.get(request_id)
        if job is not None:
            job.cancelled = True
            await self.engine.abort(request_id)

    async def keep_leases(self) -> None:
        """Renew the lease on every request this worker holds, every third of its length,
        so no other worker takes them over while this one is alive; let handed-back
        ones lapse at once."""
        lease = self.settings.claim_lease_seconds
        while True:
            await asyncio.sleep(lease / 3)
            await self.renew_leases()

    async def renew_leases(self) -> None:
        lapsing, self._lapsing = self._lapsing, set()
        try:
            await self.store.renew_leases(list(self.running), self.worker_name, self.settings.claim_lease_seconds)
            await self.store.renew_leases(lapsing, self.worker_name, 0)
        except Exception as exc:
            if not is_transient(exc):
                raise
            # Redis is away: the leases may lapse and another worker run these again
            # (at least once, as Kafka delivers); their results are still written once.
            log.warning("lease_renewal_failed", error=str(exc), running=len(self.running))

    async def drain(self, grace_seconds: float) -> None:
        """Let running requests finish within the grace period, then hand back the rest."""
        if self._tasks and self.fatal is None:
            log.info("worker_draining", running=len(self._tasks), grace_seconds=grace_seconds)
            await asyncio.wait(self._tasks, timeout=grace_seconds)
        for request_id in list(self.running):
            await self.engine.abort(request_id)  # handed back: no result, offset left uncommitted
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        await self.close()
        await self.renew_leases()  # lets the handed-back ones lapse for the next worker

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _generate(self, job: Job) -> None:
        started = time.time()
        self.running[job.request_id] = job
        self._update_gauges()
        self.metrics.batch_size.observe(len(self.running))
        result: GenerationResult | None = None
        try:
            # Deltas go out as they come (the last output's text is in its result).
            async for output in self.engine.generate(self._generation_request(job)):
                result = output.result
                if result is None and output.delta:
                    self.progress.add(job.request_id, output.delta)
        except EngineError as exc:
            self.fatal = exc  # the engine is dead: stop the process, leave this uncommitted
            log.error("engine_died", error=str(exc), **job.log_fields())
            self.on_fatal()
            return
        except Exception:
            log.exception("request_failed_in_engine", **job.log_fields())
            result = GenerationResult(job.request_id, finish_reason="error", error="the engine failed on this request")
        finally:
            self.running.pop(job.request_id, None)
            self._guarded.discard(job.request_id)
            self.progress.forget(job.request_id)
            self._update_gauges()
        if result is None:
            result = GenerationResult(job.request_id, finish_reason="error", error="the engine returned no result")
        self._trace_generation(job, result, started, time.time())
        if result.finish_reason == "abort":
            self.metrics.stats.aborted += 1
            if job.cancelled:  # the record is final already: nothing to write
                self._observe(result, started)  # its tokens were generated all the same
                self.metrics.count_cancelled()
                log.info("request_aborted", reason="cancelled", **job.log_fields())
                self.results.done(job)
            else:  # shutting down: another worker runs it again, without waiting for our lease
                log.info("request_handed_back", **job.log_fields())
                self._lapsing.add(job.request_id)
                self.results.hand_back(job)
            return
        self._observe(result, started)
        self.results.put(job, _outcome(job, result, self.engine.model_name))

    def _update_gauges(self) -> None:
        # The engine says how many of the requests it holds are in its running
        # batch; the rest wait there for a slot.
        running = min(self.engine.running, len(self.running))
        self.metrics.running.set(running)
        self.metrics.waiting.set(len(self.running) - running)

    def _generation_request(self, job: Job) -> GenerationRequest:
        message = job.message
        prompt, messages = (message.input.prompt, None) if isinstance(message.input, PromptInput) \
            else (None, message.input.messages)
        return GenerationRequest(message.id, message.params, prompt=prompt, messages=messages,
                                 adapter=message.adapter,
                                 priority=engine_priority(job.lane, message.priority or 0, job.guarded),
                                 trace_headers=self.tracing.headers_of(job.span))

    def _trace_generation(self, job: Job, result: GenerationResult, start: float, end: float) -> None:
        """One GenAI span per request, under its `process` span, covering its time in the engine."""
        if not job.span.is_recording():  # not sampled (or tracing off): its children wouldn't be either
            return
        params = job.message.params
        model = self.engine.model_name
        operation = "text_completion" if isinstance(job.message.input, PromptInput) else "chat"
        span = self.tracing.start_span(
            f"{operation} {model}", context=trace.set_span_in_context(job.span),
            start_time=int(start * 1e9), kind=SpanKind.INTERNAL,
            attributes={"gen_ai.operation.name": operation, "gen_ai.request.model": model,
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


def _outcome(job: Job, result: GenerationResult, model: str) -> Outcome:
    if result.error is not None:
        return Outcome(job.message.id, Status.failed, finish_reason="error",
                       error_type="generation_failed", error_message=result.error, model=model)
    return Outcome(job.message.id, Status.succeeded, text=result.text, finish_reason=result.finish_reason,
                   prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens, model=model)
