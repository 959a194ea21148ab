"""The scaler's loop: read the lag, decide, act, report; once per poll interval.

The lag is read on both lanes at once (the request topic and the bulk topic)
and weighed per lane by the policy. Every decision is one structured log line
(depth, bulk_depth, current, desired, reason) and sets the Prometheus gauges. A failed lag read or backend call is logged
and the turn skipped: nothing is scaled on a reading it does not have.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import structlog
from prometheus_client import Counter, Gauge

from scaler.backends import Backend
from scaler.policy import Decision, PolicyConfig, ScalingPolicy
from scaler.pools import Pool
from scaler.settings import ScalerSettings
from shared.lag import LagReader
from shared.metrics import ServedMetrics
from shared.settings import ServiceSettings

log = structlog.get_logger(__name__)


@dataclass
class ScalerStats:
    decisions: int = 0
    scale_ups: int = 0
    scale_downs: int = 0
    errors: int = 0
    peak_workers: int = 0


class ScalerMetrics(ServedMetrics):
    """Gauges on a registry of their own (the process may host other metrics)."""

    def __init__(self) -> None:
        super().__init__()
        self.queue_depth = Gauge("llmq_scaler_queue_depth", "Lag of the worker group on each lane's topic",
                                 ["lane"], registry=self.registry)
        self.desired = Gauge("llmq_scaler_desired_workers", "Workers the policy asks for", registry=self.registry)
        self.current = Gauge("llmq_scaler_current_workers", "Workers running and not stopping",
                             registry=self.registry)
        self.draining = Gauge("llmq_scaler_draining_workers", "Workers asked to stop that have not exited yet",
                              registry=self.registry)
        self.partitions = Gauge("llmq_scaler_partitions", "Partitions of the request topic(s)", registry=self.registry)
        self.scale_events = Counter("llmq_scaler_scale_events", "Decisions that changed the worker count",
                                    ["direction"], registry=self.registry)
        self.errors = Counter("llmq_scaler_errors", "Turns skipped on a failed lag read or backend call",
                              registry=self.registry)


class Scaler:
    def __init__(self, settings: ServiceSettings, scaler_settings: ScalerSettings, backend: Backend,
                 lag_reader: LagReader | None = None, clock=time.monotonic, echo=None) -> None:
        self.settings = settings
        self.scaler_settings = scaler_settings
        self.backend = backend
        self.pool = Pool.of(scaler_settings.pool, settings)
        self.lag = lag_reader or LagReader(self.pool.lag_settings(settings), list(self.pool.topics))
        self.policy = ScalingPolicy(PolicyConfig.from_settings(scaler_settings))
        self.metrics = ScalerMetrics()
        self.stats = ScalerStats()
        self.clock = clock
        self.echo = echo  # dry run: called with a one-line description of each decision
        self.last_decision: Decision | None = None
        self._stopping = asyncio.Event()
        self._closed = False

    def stop(self) -> None:
        """Ask the loop to end after this turn. Safe from a signal handler."""
        self._stopping.set()

    async def run(self) -> None:
        try:
            await self.start()
            while not self._stopping.is_set():
                await self.tick()
                try:
                    await asyncio.wait_for(self._stopping.wait(), self.scaler_settings.poll_interval_seconds)
                except TimeoutError:
                    pass
        finally:
            await self.close()

    async def start(self) -> None:
        s = self.scaler_settings
        if s.metrics_port:
            self.metrics.serve(s.metrics_port, s.metrics_host)
        await self.backend.start()
        await self.lag.start()
        log.info("scaler_started", pool=self.pool.name, topics=list(self.pool.topics), group=self.pool.group, min=s.min, max=s.max, bulk_max_workers=s.bulk_max_workers,
                 target_per_worker=s.target_per_worker,
                 activation_threshold=s.activation_threshold, poll_interval_seconds=s.poll_interval_seconds,
                 stabilization_seconds=s.stabilization_seconds, idle_seconds=s.idle_seconds,
                 dry_run=s.dry_run, metrics_port=s.metrics_port or None, **self.backend.describe())

    async def tick(self) -> Decision | None:
        """One turn: read, decide, act. Returns the decision, None if the turn was skipped."""
        # 1) read the depth and the workers there are
        try:
            reading = await self.lag.read()
            current = await self.backend.current()
        except Exception as exc:  # broker or API down: keep what runs, try again next turn
            self.stats.errors += 1
            self.metrics.errors.inc()
            log.warning("scaler_read_failed", error=repr(exc))
            return None
        # 2) decide
        interactive, bulk = self.pool.depths(reading)
        decision = self.policy.decide(self.clock(), interactive, current, reading.partition_count, bulk)
        self.stats.decisions += 1
        self._report(decision)
        # 3) act
        if decision.changes and not self.scaler_settings.dry_run:
            try:
                await self.backend.scale(decision.desired)
            except Exception as exc:
                self.stats.errors += 1
                self.metrics.errors.inc()
                log.warning("scale_failed", desired=decision.desired, error=repr(exc))
                return decision
            if decision.desired > current:
                self.stats.scale_ups += 1
                self.metrics.scale_events.labels("up").inc()
            else:
                self.stats.scale_downs += 1
                self.metrics.scale_events.labels("down").inc()
            self.stats.peak_workers = max(self.stats.peak_workers, decision.desired)
        self.stats.peak_workers = max(self.stats.peak_workers, current)
        return decision

    def _report(self, d: Decision) -> None:
        m = self.metrics
        m.queue_depth.labels("interactive").set(d.depth)
        m.queue_depth.labels("bulk").set(d.bulk_depth)
        m.desired.set(d.desired)
        m.current.set(d.current)
        m.partitions.set(d.partitions)
        m.draining.set(self.backend.draining())
        fields = dict(depth=d.depth, bulk_depth=d.bulk_depth, current=d.current, desired=d.desired, reason=d.reason,
                      target=d.target, partitions=d.partitions, draining=self.backend.draining())
        # Every decision is a line; one that repeats the previous one exactly (a
        # steady state, once a second) is at debug level, to keep the log readable.
        previous = self.last_decision
        self.last_decision = d
        if d.changes or previous is None or (d.depth, d.bulk_depth, d.current, d.reason) != (
                previous.depth, previous.bulk_depth, previous.current, previous.reason):
            log.info("scaling_decision", dry_run=self.scaler_settings.dry_run, **fields)
        else:
            log.debug("scaling_decision", dry_run=self.scaler_settings.dry_run, **fields)
        if self.echo is not None:
            bulk = f" bulk_depth={d.bulk_depth}" if d.bulk_depth else ""
            self.echo(f"depth={d.depth}{bulk} current={d.current} desired={d.desired} reason={d.reason} "
                      f"target={d.target} partitions={d.partitions}" + (" (dry run: not acting)" if d.changes else ""))

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await self.backend.close()
        finally:
            await self.lag.close()
            self.metrics.close()
            log.info("scaler_stopped", **vars(self.stats), **self.backend.counters())
