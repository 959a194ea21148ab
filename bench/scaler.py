"""Scaler benchmark: a step load (idle -> burst -> idle) on workers the scaler
starts from zero, against the same load on one fixed worker.

    python -m bench.scaler [--requests N] [--token-delay-ms MS] [--engine echo|torch|vllm] [--max N] [--json out.json]

(--engine vllm: run it with .venv-vllm/bin/python, whose workers then have vllm.)

One run starts its own broker (Tansu), redis-server and gateway process on
free loopback ports; the scaler runs in this process with its local backend,
so its workers are real `python -m workers.main` processes. Per scenario:

  first consume     first request submitted -> first request marked running
                    by a worker (Redis `started_at`)
  scaler reaction   first request submitted -> first worker process spawned
  worker imports    process start + imports of `workers.main`, measured alone
  worker ready      spawn -> `worker_started` of the first worker, from its JSON
                    log: process start, imports, engine start (model load),
                    clients, joining the consumer group (the dev broker takes
                    ~5 s to complete a new group's first join); in parts:
    before engine   spawn -> the engine's start begins (process start, imports)
    engine start    the engine's own start (`engine_started`: model load; for
                    vllm also importing vllm and starting its EngineCore process)
    after engine    engine started -> `worker_started` (clients, consumer)
  first result      first request submitted -> first request final
  peak workers      most live workers seen (sampled every 100 ms)
  drain             first submitted -> last request final
  back to min       last request final -> live workers == min again
  lost              submitted - succeeded (must be 0); double = results written twice

Target: first consume <= 2 s + the worker's own start. A benchmark, never part of the tests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

import aiohttp
import redis.asyncio as aioredis

from deploy.devstack import free_port, python_env, start_broker, start_redis, wait_for_port
from deploy.settings import StackSettings
from scaler.backends.local import LocalBackend
from scaler.daemon import Scaler
from scaler.settings import ScalerSettings
from shared.keys import Keys

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Result:
    scenario: str
    requests: int
    first_consume_s: float | None = None
    scaler_reaction_s: float | None = None
    worker_imports_s: float | None = None
    worker_ready_s: float | None = None
    before_engine_s: float | None = None
    engine_start_s: float | None = None
    after_engine_s: float | None = None
    first_result_s: float | None = None
    peak_workers: int = 0
    drain_s: float | None = None
    back_to_min_s: float | None = None
    lost: int = 0
    double: int = 0


def _log_events(log_dir: Path) -> list[tuple[Path, dict]]:
    events = []
    for path in sorted(log_dir.glob("worker-*.log")):
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    events.append((path, json.loads(line)))
                except ValueError:
                    pass
    return events


def _ts(event: dict) -> float:
    return datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()


def _worker_start_times(log_dir: Path) -> tuple[float | None, float | None, float | None]:
    """(spawned, started, joined) wall times of the first worker, from its log file."""
    times = _first_worker_events(log_dir)
    return times.get("spawned"), times.get("worker_started"), times.get("partitions_assigned")


def _first_worker_events(log_dir: Path) -> dict[str, float]:
    """Wall times of the first worker's start-up: spawned, engine_start_began, engine_started,
    worker_started, partitions_assigned (those it has logged)."""
    files = sorted(log_dir.glob("worker-*.log"), key=lambda p: int(p.stem.rsplit("-", 1)[1]))
    if not files:
        return {}
    first = files[0]
    times = {"spawned": int(first.stem.rsplit("-", 1)[1]) / 1000}
    for path, event in _log_events(log_dir):
        name = event.get("event")
        if path != first or name in times:
            continue
        if name in ("engine_started", "worker_started", "partitions_assigned"):
            times[name] = _ts(event)
        if name == "engine_started":
            times["engine_start_began"] = times[name] - event["seconds"]
    return times


async def wait_ready(url: str, timeout: float = 60) -> None:
    """Until the gateway at `url` answers /readyz with 200 (RuntimeError after `timeout`)."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            try:
                async with http.get(f"{url}/readyz") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError("gateway not ready")


async def scenario(name: str, base: StackSettings, args, workdir: Path, scaled: bool) -> Result:
    tag = uuid.uuid4().hex[:6]
    settings = base.model_copy(update={"request_topic": f"bench.{tag}", "dlq_topic": f"bench.{tag}.dlq",
                                       "consumer_group": f"bench-{tag}", "redis_prefix": f"bench-{tag}",
                                       "http_port": free_port()})
    log_dir = workdir / name
    scaler_settings = ScalerSettings(
        backend="local", min=0 if scaled else 1, max=args.max if scaled else 1, target_per_worker=args.target,
        poll_interval_seconds=args.poll, stabilization_seconds=args.stabilization, idle_seconds=args.idle,
        grace_seconds=30, state_dir=workdir / "state", worker_log_dir=log_dir)
    gateway = subprocess.Popen([sys.executable, "-m", "gateway.main"], env=python_env(**settings.to_env()), cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    redis = aioredis.from_url(settings.redis_url)
    keys = Keys(settings.redis_prefix)
    backend = LocalBackend(settings, scaler_settings)
    scaler = Scaler(settings, scaler_settings, backend)
    scaler_task = asyncio.create_task(scaler.run())
    samples: list[tuple[float, int]] = []

    async def sample():
        while True:
            samples.append((time.time(), len(backend.pids())))
            await asyncio.sleep(0.1)

    sampler = asyncio.create_task(sample())
    result = Result(name, args.requests)
    try:
        url = f"http://127.0.0.1:{settings.http_port}"
        wait_for_port(settings.http_port, 60, gateway, "gateway")
        await wait_ready(url)
        if not scaled:  # the fixed worker is up and has joined before the load starts
            while not (log_dir.exists() and _worker_start_times(log_dir)[2]):
                await asyncio.sleep(0.1)
        await asyncio.sleep(args.idle_before)

        # 1) burst
        prompt = " ".join(["word"] * args.words)
        body = {"input": {"prompt": prompt}, "params": {"max_tokens": args.words}}
        async with aiohttp.ClientSession() as http:
            async def post() -> tuple[float, str]:
                at = time.time()
                async with http.post(f"{url}/v1/requests", json=body) as resp:
                    assert resp.status == 202, await resp.text()
                    return at, (await resp.json())["id"]

            sent = await asyncio.gather(*(post() for _ in range(args.requests)))
        t0 = min(at for at, _ in sent)
        ids = [i for _, i in sent]

        # 2) until every request is final
        final = ("succeeded", "failed", "cancelled", "expired")
        records: dict[str, dict] = {}
        while len(records) < len(ids):
            # One round trip per poll: on 2 cores, a read per request every 0.1 s took CPU
            # from the worker starting (and so lengthened the start it measures).
            pending = [i for i in ids if i not in records]
            async with redis.pipeline(transaction=False) as pipe:
                for i in pending:
                    pipe.hgetall(keys.request(i))
                replies = await pipe.execute()
            for i, reply in zip(pending, replies):
                record = {k.decode(): v.decode() for k, v in reply.items()}
                if record.get("status") in final:
                    records[i] = record
            await asyncio.sleep(0.25)
        drained_at = max(float(r["finished_at"]) for r in records.values())

        # 3) until the workers are back to min
        while len(backend.pids()) != scaler_settings.min or backend.draining():
            await asyncio.sleep(0.1)
        back_at = time.time()

        started = [float(r["started_at"]) for r in records.values() if r.get("started_at")]
        result.first_consume_s = min(started) - t0
        result.drain_s = drained_at - t0
        result.back_to_min_s = back_at - drained_at
        result.peak_workers = max(n for _, n in samples)
        result.lost = sum(1 for r in records.values() if r["status"] != "succeeded")
        written = Counter(e["request_id"] for _, e in _log_events(log_dir)
                          if e.get("event") == "request_finished" and e.get("written"))
        result.double = sum(1 for n in written.values() if n > 1)
        result.lost += len(set(ids) - set(written))
        result.first_result_s = min(float(r["finished_at"]) for r in records.values()) - t0
        times = _first_worker_events(log_dir)
        spawned, worker_started = times.get("spawned"), times.get("worker_started")
        if scaled and spawned:
            result.scaler_reaction_s = spawned - t0
        if spawned and worker_started:
            result.worker_ready_s = worker_started - spawned
        if spawned and "engine_started" in times:
            result.before_engine_s = times["engine_start_began"] - spawned
            result.engine_start_s = times["engine_started"] - times["engine_start_began"]
            if worker_started:
                result.after_engine_s = worker_started - times["engine_started"]
        result.worker_imports_s = _import_seconds()
        return result
    finally:
        sampler.cancel()
        scaler.stop()
        await scaler_task
        gateway.terminate()
        gateway.wait(10)
        await redis.aclose()


def _import_seconds() -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import workers.main"], cwd=REPO, check=True)
    return time.perf_counter() - started


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


async def main_async(args) -> list[Result]:
    with tempfile.TemporaryDirectory(prefix="llmq-bench-scaler-") as tmp:
        workdir = Path(tmp)
        broker = start_broker(free_port(), workdir / "broker.log")
        redis = start_redis(free_port(), workdir / "redis")
        try:
            base = StackSettings(kafka_bootstrap=broker.url, redis_url=redis.url, engine=args.engine,
                            echo_token_delay_ms=args.token_delay_ms, batch_max_size=args.batch_max_size,
                            request_partitions=args.partitions, log_format="json",
                            **({"auth": False} if "auth" in StackSettings.model_fields else {}),
                            **({"model": args.model} if args.model else {}))
            results = [await scenario("scaler 0..%d" % args.max, base, args, workdir, scaled=True),
                       await scenario("fixed 1 worker", base, args, workdir, scaled=False)]
        finally:
            redis.stop()
            broker.stop()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench.scaler", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--words", type=int, default=8, help="prompt words = output tokens of the echo engine")
    parser.add_argument("--token-delay-ms", type=float, default=50)
    parser.add_argument("--batch-max-size", type=int, default=8)
    parser.add_argument("--engine", choices=["echo", "torch", "vllm"], default="echo")
    parser.add_argument("--model", help="torch and vllm engines: model path (default: LLMQ_MODEL's default)")
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--max", type=int, default=4)
    parser.add_argument("--target", type=int, default=10)
    parser.add_argument("--poll", type=float, default=1.0)
    parser.add_argument("--stabilization", type=float, default=10.0)
    parser.add_argument("--idle", type=float, default=15.0)
    parser.add_argument("--idle-before", type=float, default=2.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.engine == "vllm":
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            parser.error("--engine vllm needs vllm where the workers run: run this with .venv-vllm/bin/python")
    results = asyncio.run(main_async(args))
    print(f"\nstep load: {args.requests} requests at once, engine {args.engine}, {args.words} tokens each at "
          f"{args.token_delay_ms} ms/token, batches of <= {args.batch_max_size}, {args.partitions} partitions; "
          f"scaler: target {args.target}/worker, poll {args.poll} s, stabilization {args.stabilization} s, "
          f"idle {args.idle} s; {os.cpu_count()} CPUs")
    columns = [("scenario", "scenario"), ("first consume s", "first_consume_s"),
               ("scaler reaction s", "scaler_reaction_s"), ("worker imports s", "worker_imports_s"),
               ("worker ready s", "worker_ready_s"), ("before engine s", "before_engine_s"),
               ("engine start s", "engine_start_s"), ("after engine s", "after_engine_s"),
               ("first result s", "first_result_s"), ("peak workers", "peak_workers"), ("drain s", "drain_s"),
               ("back to min s", "back_to_min_s"), ("lost", "lost"), ("run twice", "double")]
    print("| " + " | ".join(c for c, _ in columns) + " |")
    print("|" + "---|" * len(columns))
    for r in results:
        print("| " + " | ".join(_fmt(getattr(r, f)) for _, f in columns) + " |")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))


if __name__ == "__main__":
    main()
