"""The `scaler` command as a process: a restarted scaler adopts the workers the
last one left (it holds no state that matters), Ctrl-C leaves no worker
behind, and --dry-run only prints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from aiokafka import AIOKafkaProducer

from deploy.devstack import python_env
from scaler.backends.local import is_llmq_worker
from shared.kafka import ensure_topics


def _scaler(settings, *flags: str, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "scaler.main", *flags],
                            env=python_env(**settings.model_copy(update={"log_format": "json"}).to_env()),
                            stdin=subprocess.DEVNULL, **popen)


def _pids(state_dir: Path) -> list[int]:
    files = list(state_dir.glob("local-workers.*.json"))
    return json.loads(files[0].read_text())["pids"] if files else []


def _wait(what: str, predicate, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_restarted_scaler_adopts_its_workers_and_ctrl_c_stops_them(settings, tmp_path):
    state = tmp_path / "state"
    flags = ("--backend", "local", "--min", "1", "--max", "2", "--poll-interval", "0.2", "--state-dir", str(state))
    first = _scaler(settings, *flags, start_new_session=True)
    try:
        _wait("the first scaler's worker", lambda: len(_pids(state)) == 1 and is_llmq_worker(_pids(state)[0]))
        worker = _pids(state)[0]
    finally:
        first.kill()  # the scaler crashes: its worker (own session) keeps serving
        first.wait()
    assert is_llmq_worker(worker, settings.consumer_group)

    second = _scaler(settings, *flags, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        time.sleep(2.5)  # ten decisions: it must neither start another worker nor lose this one
        assert second.poll() is None
        assert _pids(state) == [worker]
    finally:
        os.killpg(second.pid, signal.SIGINT)  # Ctrl-C
        _out, err = second.communicate(timeout=60)
    assert second.returncode == 0, err[-3000:]
    events = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert any(e["event"] == "workers_adopted" and e["adopted"] == [worker] for e in events)
    assert not is_llmq_worker(worker)  # drained and gone, no orphan
    assert _pids(state) == []


async def test_dry_run_prints_decisions_and_starts_nothing(settings, tmp_path):
    await ensure_topics(settings)
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, enable_idempotence=False)
    await producer.start()
    try:
        for i in range(3):
            await producer.send_and_wait(settings.request_topic, b"{}", partition=i)
    finally:
        await producer.stop()
    state = tmp_path / "state"
    proc = _scaler(settings, "--dry-run", "--min", "0", "--poll-interval", "0.2", "--state-dir", str(state),
                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        first_line = proc.stdout.readline()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert first_line.startswith("depth=3 current=0 desired=1 reason=activation"), first_line
    assert _pids(state) == []
