"""Small helpers the integration tests share: HTTP calls, waiting, a worker
as a child process, and the group's committed offsets as Kafka holds them."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

from aiohttp import ClientSession
from aiokafka import AIOKafkaConsumer, TopicPartition

from deploy.devstack import python_env


async def submit(http: ClientSession, base: str, body: dict) -> str:
    async with http.post(f"{base}/v1/requests", json=body) as resp:
        assert resp.status == 202, await resp.text()
        return (await resp.json())["id"]


async def wait_final(http: ClientSession, base: str, request_id: str, timeout: float = 30,
                     not_yet_recorded: bool = False) -> dict:
    """Long-poll until the request is final. `not_yet_recorded`: a request produced
    straight to Kafka is unknown (404) until a worker records it."""
    deadline = time.monotonic() + timeout
    view = None
    while time.monotonic() < deadline:
        async with http.get(f"{base}/v1/requests/{request_id}", params={"wait": "5"}) as resp:
            if resp.status == 404 and not_yet_recorded:
                await asyncio.sleep(0.05)
                continue
            assert resp.status == 200, await resp.text()
            view = await resp.json()
        if view["status"] not in ("queued", "running"):
            return view
    raise AssertionError(f"{request_id} not finished within {timeout} s: {view}")


async def wait_until(predicate, timeout: float = 30, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class WorkerProcess:
    """A `python -m workers.main` child with its log in a file (shown when a test fails)."""

    def __init__(self, settings, log_path: Path) -> None:
        self.log_path = log_path
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "workers.main"], env=python_env(**settings.to_env()),
                                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    async def exit_code(self, timeout: float) -> int:
        try:
            return await asyncio.to_thread(self.proc.wait, timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"worker still running {timeout} s after being told to stop:\n{self.log()}") from None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


async def committed_offsets(settings) -> list[int | None]:
    """The worker group's committed offset on each partition of the request topic
    (None: never committed), read by a probe that joins no group."""
    probe = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, group_id=settings.consumer_group,
                             enable_auto_commit=False)
    await probe.start()
    try:
        return [await probe.committed(TopicPartition(settings.request_topic, p))
                for p in range(settings.request_partitions)]
    finally:
        await probe.stop()


def llmq(settings, *args: str, **env: str) -> subprocess.CompletedProcess:
    """The real `llmq ...` command, with the test's settings (and `env`) in its environment."""
    return subprocess.run([sys.executable, "-m", "deploy.cli", *args], env=python_env(**{**settings.to_env(), **env}),
                          capture_output=True, text=True, timeout=90)


def llmq_keys(settings, *args: str) -> subprocess.CompletedProcess:
    """`llmq keys ...` against the test's Redis."""
    return llmq(settings, "keys", *args)


def api_keys(settings, *names: str) -> dict[str, str]:
    """A new API key for each name (`llmq keys create`), by name."""
    keys = {}
    for name in names:
        made = llmq_keys(settings, "create", name)
        assert made.returncode == 0, made.stderr
        keys[name] = made.stdout.strip()
    return keys


async def sse_events(resp):
    """The Server-Sent Events of an open response, as dicts {event, id, data} (data
    parsed as JSON when it is), parsed by the rules of the SSE spec a browser follows."""
    import json

    event: dict = {}
    async for raw in resp.content:
        line = raw.decode().rstrip("\r\n")
        if not line:
            if "data" in event:
                try:
                    event["data"] = json.loads(event["data"])
                except ValueError:
                    pass
                yield event
            event = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            event[name] = f"{event[name]}\n{value}" if name == "data" and "data" in event else value
