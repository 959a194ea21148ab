"""The scaler with its local backend, end to end: a real gateway, broker, Redis
and real worker processes (echo engine, with simulated generation time)
started and stopped by the scaler from the queue's depth."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from pathlib import Path

import pytest

from scaler.backends.local import LocalBackend, is_llmq_worker
from scaler.daemon import Scaler
from scaler.settings import ScalerSettings
from shared.ports import free_port
from tests.integration.helpers import submit, wait_final, wait_until

# 5 words at 60 ms each: a batch takes 0.3 s; batches of up to 4 keep one worker at ~13 requests/s.
PROMPT = "one two three four five"


@pytest.fixture
def worker_settings(settings):
    return settings.model_copy(update={"echo_token_delay_ms": 60, "batch_max_size": 4, "log_format": "json",
                                       "session_timeout_ms": 6000})


@pytest.fixture
async def start_scaler(worker_settings, tmp_path):
    """Runs the scaler's loop in this process; its workers are real processes. Stopped after the test."""
    running: list[tuple[Scaler, asyncio.Task]] = []

    async def start(**overrides) -> Scaler:
        options = dict(backend="local", min=0, max=4, target_per_worker=5, poll_interval_seconds=0.2,
                       stabilization_seconds=1.5, idle_seconds=2.0, grace_seconds=15,
                       state_dir=tmp_path / "state", worker_log_dir=tmp_path / "workers",
                       worker_metrics_port=0)  # the workers serve no metrics, as elsewhere in the tests
        options.update(overrides)
        scaler_settings = ScalerSettings(**options)
        scaler = Scaler(worker_settings, scaler_settings, LocalBackend(worker_settings, scaler_settings))
        running.append((scaler, asyncio.create_task(scaler.run())))
        return scaler

    yield start
    for scaler, _ in running:
        scaler.stop()
    for _, task in running:
        await asyncio.wait_for(task, 60)


def _written_per_request(log_dir: Path) -> Counter:
    """How many times a worker wrote each request's result, from the workers' JSON logs."""
    written: Counter = Counter()
    for path in log_dir.glob("worker-*.log"):
        for line in path.read_text(errors="replace").splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue  # a library's plain-text warning
            if event.get("event") == "request_finished" and event.get("written"):
                written[event["request_id"]] += 1
    return written


async def _logged_writes(log_dir: Path, ids: list[str]) -> Counter:
    """_written_per_request once every id has its line: a worker logs a write just after
    making it, so a client may see the result a moment before the line is in the file."""
    await wait_until(lambda: _async(set(_written_per_request(log_dir)) >= set(ids)), timeout=10,
                     what="every write logged")
    return _written_per_request(log_dir)


class WorkerCounts:
    """Samples the scaler's live worker count in the background."""

    def __init__(self, scaler: Scaler) -> None:
        self.scaler = scaler
        self.samples: list[int] = []
        self._task = asyncio.create_task(self._sample())

    async def _sample(self) -> None:
        while True:
            self.samples.append(len(self.scaler.backend.pids()))
            await asyncio.sleep(0.1)

    async def stop(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


async def test_burst_from_zero_scales_up_serves_everything_once_and_returns_to_zero(
        worker_settings, gateway, http, start_scaler, tmp_path):
    scaler = await start_scaler(min=0, max=4)
    await wait_until(lambda: _async(scaler.stats.decisions > 0), timeout=20, what="the scaler's first decision")
    assert scaler.backend.pids() == []  # nothing queued: no worker

    counts = WorkerCounts(scaler)
    ids = await asyncio.gather(*(submit(http, gateway.url, {"input": {"prompt": PROMPT}}) for _ in range(80)))
    views = await asyncio.gather(*(wait_final(http, gateway.url, i, timeout=90) for i in ids))
    assert [v["status"] for v in views] == ["succeeded"] * len(ids)
    assert all(v["output"]["text"] == PROMPT for v in views)

    # back to min (zero) once idle, and no worker process left behind
    pids_seen = set(scaler.backend.pids())
    await wait_until(lambda: _async(scaler.backend.pids() == [] and scaler.backend.draining() == 0),
                     timeout=60, what="workers back to zero")
    await counts.stop()
    assert max(counts.samples) >= 2, counts.samples  # went up...
    assert counts.samples[-1] == 0  # ...and came back down
    assert scaler.stats.scale_ups >= 2 and scaler.stats.scale_downs >= 1
    assert not any(is_llmq_worker(pid) for pid in pids_seen)

    written = await _logged_writes(tmp_path / "workers", ids)
    assert set(written) == set(ids)
    assert set(written.values()) == {1}, {i: n for i, n in written.items() if n != 1}


async def test_scale_down_during_load_loses_nothing(worker_settings, gateway, http, start_scaler, tmp_path):
    # A burst takes it up to 4 workers; a trickle of requests keeps coming while the
    # backlog shrinks, so workers are stopped while others (and they) hold requests.
    scaler = await start_scaler(min=1, max=4, stabilization_seconds=1.0)
    await wait_until(lambda: _async(len(scaler.backend.pids()) == 1), timeout=30, what="min workers")

    ids = list(await asyncio.gather(*(submit(http, gateway.url, {"input": {"prompt": PROMPT}}) for _ in range(70))))
    await wait_until(lambda: _async(len(scaler.backend.pids()) >= 3), timeout=30, what="the scale-up")
    stops_before_trickle = scaler.backend.stopped + scaler.backend.draining()
    deadline = time.monotonic() + 60
    while scaler.backend.stopped + scaler.backend.draining() - stops_before_trickle < 2:
        assert time.monotonic() < deadline, "no scale-down under the trickle"
        ids.append(await submit(http, gateway.url, {"input": {"prompt": PROMPT}}))
        await asyncio.sleep(0.1)
    ids += await asyncio.gather(*(submit(http, gateway.url, {"input": {"prompt": PROMPT}}) for _ in range(10)))

    views = await asyncio.gather(*(wait_final(http, gateway.url, i, timeout=90) for i in ids))
    assert [v["status"] for v in views] == ["succeeded"] * len(ids)
    await wait_until(lambda: _async(len(scaler.backend.pids()) == 1 and scaler.backend.draining() == 0),
                     timeout=60, what="workers back to min")
    # A worker stopped while still joining the group (slow on the dev broker under load) may
    # outlast the grace period and be killed; it held nothing, and nothing may be lost either way.
    assert scaler.backend.stopped >= 2

    written = await _logged_writes(tmp_path / "workers", ids)
    assert set(written) == set(ids)
    assert set(written.values()) == {1}, {i: n for i, n in written.items() if n != 1}


async def _async(value):
    return value


async def test_workers_started_together_each_serve_metrics_on_a_port_of_their_own(start_scaler, http):
    base = free_port()
    scaler = await start_scaler(min=3, max=3, worker_metrics_port=base)
    await wait_until(lambda: _async(len(scaler.backend.pids()) == 3), timeout=30, what="three workers")
    ports = sorted(worker.metrics_port for worker in scaler.backend.workers)
    assert len(set(ports)) == 3 and ports[0] >= base, ports

    async def all_serve_metrics() -> bool:
        for port in ports:
            try:
                async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
                    if resp.status != 200 or "llmq_worker_requests_total" not in await resp.text():
                        return False
            except OSError:
                return False
        return True

    await wait_until(all_serve_metrics, timeout=60, what="each worker's /metrics")


async def test_bulk_lag_alone_wakes_one_worker_that_serves_it_all(worker_settings, gateway, http, start_scaler):
    """60 bulk requests would ask for 4 workers as interactive ones (5 per worker, max 4);
    as bulk they wake LLMQ_SCALER_BULK_MAX_WORKERS=1, which serves them all."""
    scaler = await start_scaler(bulk_max_workers=1)
    ids = [await submit(http, gateway.url, {"input": {"prompt": PROMPT}, "lane": "bulk"}) for _ in range(60)]
    bulk_depths = []

    async def all_final():
        bulk_depths.append(scaler.metrics.registry.get_sample_value("llmq_scaler_queue_depth", {"lane": "bulk"}) or 0)
        views = [await gateway.store.get(i) for i in ids]
        return all(v.status.value == "succeeded" for v in views)

    await wait_until(all_final, timeout=90, what="every bulk request to succeed")
    assert max(bulk_depths) >= 10  # the scaler saw the bulk lane's backlog ...
    assert scaler.stats.peak_workers == 1  # ... and started one worker for it, not four
    assert scaler.last_decision.depth == 0  # no interactive lag counted
