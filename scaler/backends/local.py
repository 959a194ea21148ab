"""Workers (or trainers: the scaler's pool) as child processes of the scaler
(`python -m workers.main`, `python -m workers.training.main`), for `make up`
and single machines.

Scale down: SIGTERM the newest worker (it stops fetching, finishes its batch,
commits and leaves the group), SIGKILL it if it has not exited within the
grace period (what it had not committed is redelivered to another worker).
A stopping worker no longer counts as current.

The pids it started are kept in a state file: a restarted scaler adopts the
ones still alive that are llmq workers of the same group, and forgets the
rest. On close (Ctrl-C, SIGTERM of the scaler) it stops all of them.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import structlog

from scaler.pools import WORKERS, Pool
from scaler.settings import ScalerSettings
from shared.ports import port_is_free
from shared.settings import ServiceSettings

log = structlog.get_logger(__name__)

def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.split("\0") if "=" in item)


def is_llmq_worker(pid: int, consumer_group: str | None = None, pool: Pool = WORKERS) -> bool:
    """pid is a live process of the pool (default: request workers), of `consumer_group` when given."""
    return pool.is_member(_cmdline(pid), _environ(pid), consumer_group) and not _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


@dataclass
class WorkerProcess:
    pid: int
    started_at: float
    popen: subprocess.Popen | None = None  # None: adopted from an earlier scaler
    stopping_since: float | None = None
    metrics_port: int = 0  # the LLMQ_METRICS_PORT it was given (0: none)
    pool: Pool = WORKERS

    def alive(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        return is_llmq_worker(self.pid, pool=self.pool)

    def signal(self, sig: int) -> None:
        try:
            if self.popen is not None:
                self.popen.send_signal(sig)
            elif self.alive():
                os.kill(self.pid, sig)
        except ProcessLookupError:
            pass


class LocalBackend:
    name = "local"

    def __init__(self, settings: ServiceSettings, scaler_settings: ScalerSettings) -> None:
        self.settings = settings
        self.pool = Pool.of(scaler_settings.pool, settings)
        self.worker_metrics_port = scaler_settings.worker_metrics_port
        self.worker_engine = scaler_settings.worker_engine
        self.grace = scaler_settings.grace_seconds
        self.log_dir = scaler_settings.worker_log_dir
        safe_group = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in self.pool.group)
        self.state_file = scaler_settings.state_dir / f"local-workers.{safe_group}.json"
        self.workers: list[WorkerProcess] = []  # oldest first
        self.started = 0
        self.stopped = 0
        self.killed = 0  # did not exit within the grace period
        self.adopted = 0
        self.exited = 0  # exited on their own (crash, engine failure)
        self._stop_tasks: set[asyncio.Task] = set()
        self._closed = False

    # ---- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        """Adopt the workers an earlier scaler of this group left running."""
        try:
            pids = json.loads(self.state_file.read_text()).get("pids", [])
        except (OSError, ValueError):
            pids = []
        for pid in pids:
            if is_llmq_worker(pid, self.pool.group, self.pool):
                port = _environ(pid).get("LLMQ_METRICS_PORT", "0")
                self.workers.append(WorkerProcess(pid, time.monotonic(), metrics_port=int(port) if port.isdigit() else 0,
                                                  pool=self.pool))
                self.adopted += 1
        if pids:
            log.info("workers_adopted", adopted=[w.pid for w in self.workers], forgotten=len(pids) - self.adopted)
        self._save()

    async def close(self) -> None:
        """Stop every worker (drain, then kill after the grace period): no orphans."""
        if self._closed:
            return
        self._closed = True
        for worker in self._running():
            self._stop(worker)
        if self._stop_tasks:
            await asyncio.gather(*self._stop_tasks, return_exceptions=True)
        self._reap()
        self._save()
        log.info("local_backend_closed", **self.counters())

    # ---- the backend ---------------------------------------------------------

    async def current(self) -> int:
        self._reap()
        return len(self._running())

    async def scale(self, desired: int) -> None:
        running = self._running()
        for _ in range(desired - len(running)):
            self._spawn()
        for worker in reversed(running[desired:] if desired < len(running) else []):
            self._stop(worker)  # newest first
        self._save()

    def describe(self) -> dict:
        return {"backend": self.name, "state_file": str(self.state_file)}

    def counters(self) -> dict:
        return {"started": self.started, "stopped": self.stopped, "killed": self.killed,
                "adopted": self.adopted, "exited": self.exited}

    def draining(self) -> int:
        return sum(1 for w in self.workers if w.stopping_since is not None)

    def pids(self) -> list[int]:
        """Pids of the live workers that are not stopping, oldest first."""
        return [w.pid for w in self._running()]

    # ---- processes -----------------------------------------------------------

    def _running(self) -> list[WorkerProcess]:
        return [w for w in self.workers if w.stopping_since is None and w.alive()]

    def _spawn(self) -> None:
        # The workers read their own settings from this environment: the scaler's, with
        # its Kafka settings (flags included) on top.
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.settings.to_env()}
        if self.worker_engine:
            env["LLMQ_ENGINE"] = self.worker_engine
        metrics_port = self._metrics_port()
        env["LLMQ_METRICS_PORT"] = str(metrics_port)
        out = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            out = open(self.log_dir / f"worker-{self.started + 1}-{int(time.time() * 1000)}.log", "ab")
        try:
            # Its own session: a Ctrl-C in the terminal reaches the scaler only,
            # which then stops its workers in order.
            popen = subprocess.Popen(self.pool.command, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                     stderr=subprocess.STDOUT if out else None, start_new_session=True)
        finally:
            if out is not None:
                out.close()
        self.workers.append(WorkerProcess(popen.pid, time.monotonic(), popen, metrics_port=metrics_port,
                                          pool=self.pool))
        self.started += 1
        log.info("worker_started_by_scaler", pid=popen.pid, metrics_port=metrics_port or None)

    def _metrics_port(self) -> int:
        """A /metrics port for a new worker: the first from LLMQ_METRICS_PORT up (9400, 9401,
        ...) that no worker of ours was given and nothing else listens on. Remembered rather
        than probed alone: a worker binds its port only once its model has loaded, so a port
        given to a worker still starting looks free."""
        if not self.worker_metrics_port:
            return 0
        taken = {w.metrics_port for w in self.workers if w.alive()}
        base = self.worker_metrics_port
        return next((p for p in range(base, base + 64) if p not in taken and port_is_free(p)), 0)

    def _stop(self, worker: WorkerProcess) -> None:
        worker.stopping_since = time.monotonic()
        task = asyncio.create_task(self._drain(worker))
        self._stop_tasks.add(task)
        task.add_done_callback(self._stop_done)

    def _stop_done(self, task: asyncio.Task) -> None:
        self._stop_tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("worker_stop_failed", error=repr(task.exception()))

    async def _drain(self, worker: WorkerProcess) -> None:
        worker.signal(signal.SIGTERM)
        log.info("worker_stopping", pid=worker.pid, grace_seconds=self.grace)
        deadline = time.monotonic() + self.grace
        while worker.alive() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if worker.alive():
            worker.signal(signal.SIGKILL)
            self.killed += 1
            log.warning("worker_killed_after_grace", pid=worker.pid, grace_seconds=self.grace)
            while worker.alive():
                await asyncio.sleep(0.05)
        self.stopped += 1
        self.workers.remove(worker)
        self._save()
        log.info("worker_stopped_by_scaler", pid=worker.pid,
                 exit_code=worker.popen.returncode if worker.popen else None)

    def _reap(self) -> None:
        """Forget workers that exited on their own (crash, engine failure); stopping ones are
        forgotten by their drain task."""
        exited = [w for w in self.workers if w.stopping_since is None and not w.alive()]
        for worker in exited:
            self.workers.remove(worker)
            self.exited += 1
            log.warning("worker_exited", pid=worker.pid, exit_code=worker.popen.returncode if worker.popen else None)
        if exited:
            self._save()

    def _save(self) -> None:
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"consumer_group": self.pool.group, "pool": self.pool.name,
                                   "topics": list(self.pool.topics),
                                   "pids": [w.pid for w in self.workers if w.alive()]}))
        tmp.replace(self.state_file)
