"""Priority lanes benchmark: an interactive request's latency on an idle worker,
behind a bulk backlog in the bulk lane, and behind the same backlog sent
without lanes (all of it interactive, what llmq did before lanes).

    python -m bench.lanes [--bulk N] [--probes N] [--words N] [--token-delay-ms MS] [--batch-max-size N]
                          [--bulk-max-share F] [--json out.json]

One run starts its own broker (Tansu), redis-server, gateway process and one
worker process (echo engine, simulated generation time) on free loopback
ports, with a fresh topic per scenario. Per scenario, `--probes` interactive
requests are submitted one at a time (each with `Prefer: wait`, the next once
it is answered); their submit-to-result latency is reported (p50, p95, max),
with how many backlog requests finished while the probes ran, and in how long.
A benchmark, never part of the tests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import aiohttp

from bench.scaler import wait_ready
from deploy.devstack import free_port, python_env, start_broker, start_redis, wait_for_port
from deploy.settings import StackSettings

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Result:
    scenario: str
    backlog: int
    p50_s: float
    p95_s: float
    max_s: float
    backlog_done_by_end: int
    window_s: float  # first probe submitted -> last probe answered


async def _served(http: aiohttp.ClientSession, url: str) -> int:
    """Requests the worker has finished, from its metrics."""
    async with http.get(url) as resp:
        text = await resp.text()
    return int(sum(float(line.split()[-1]) for line in text.splitlines()
                   if line.startswith("llmq_worker_requests_total{")))


async def scenario(name: str, base: StackSettings, args, workdir: Path, backlog_lane: str | None) -> Result:
    tag = uuid.uuid4().hex[:6]
    settings = base.model_copy(update={"request_topic": f"bench.{tag}", "dlq_topic": f"bench.{tag}.dlq",
                                       "consumer_group": f"bench-{tag}", "redis_prefix": f"bench-{tag}",
                                       "http_port": free_port(), "metrics_port": free_port()})
    env = python_env(**settings.to_env())
    with open(workdir / f"{tag}.log", "ab") as log:
        gateway = subprocess.Popen([sys.executable, "-m", "gateway.main"], env=env, cwd=REPO, stdout=log, stderr=log)
        worker = subprocess.Popen([sys.executable, "-m", "workers.main"], env=env, cwd=REPO, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{settings.http_port}"
    metrics = f"http://127.0.0.1:{settings.metrics_port}/metrics"
    body = {"input": {"prompt": " ".join(["word"] * args.words)}, "params": {"max_tokens": args.words}}
    try:
        wait_for_port(settings.http_port, 60, gateway, "gateway")
        wait_for_port(settings.metrics_port, 120, worker, "worker")
        await wait_ready(url)
        async with aiohttp.ClientSession() as http:
            # 1) warm-up: the worker has joined its group and answers
            async with http.post(f"{url}/v1/requests", json=body, headers={"Prefer": "wait=60"}) as resp:
                assert resp.status == 200, await resp.text()
            # 2) the backlog, all at once
            backlog = args.bulk if backlog_lane else 0
            gate = asyncio.Semaphore(32)

            async def post_backlog():
                async with gate, http.post(f"{url}/v1/requests", json={**body, "lane": backlog_lane}) as resp:
                    assert resp.status == 202, await resp.text()

            await asyncio.gather(*(post_backlog() for _ in range(backlog)))
            before = await _served(http, metrics)
            # 3) the probes, one at a time
            latencies = []
            window_start = time.perf_counter()
            for _ in range(args.probes):
                started = time.perf_counter()
                async with http.post(f"{url}/v1/requests", json=body, headers={"Prefer": "wait=120"}) as resp:
                    assert resp.status == 200, await resp.text()
                latencies.append(time.perf_counter() - started)
                await asyncio.sleep(args.gap)
            window = time.perf_counter() - window_start
            done = await _served(http, metrics) - before - args.probes
    finally:
        for proc in (worker, gateway):
            proc.terminate()
        for proc in (worker, gateway):
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    latencies.sort()
    return Result(name, backlog, statistics.median(latencies), latencies[int(0.95 * (len(latencies) - 1))],
                  latencies[-1], max(done, 0), window)


async def main_async(args) -> list[Result]:
    with tempfile.TemporaryDirectory(prefix="llmq-bench-lanes-") as tmp:
        workdir = Path(tmp)
        broker = start_broker(free_port(), workdir / "broker.log")
        redis = start_redis(free_port(), workdir / "redis")
        try:
            base = StackSettings(kafka_bootstrap=broker.url, redis_url=redis.url, engine="echo",
                                 echo_token_delay_ms=args.token_delay_ms, batch_max_size=args.batch_max_size,
                                 request_partitions=4, log_format="json", auth=False, drain_seconds=0,
                                 bulk_max_share=args.bulk_max_share)
            return [await scenario("idle", base, args, workdir, None),
                    await scenario("bulk backlog, lanes", base, args, workdir, "bulk"),
                    await scenario("same backlog, no lanes", base, args, workdir, "interactive")]
        finally:
            redis.stop()
            broker.stop()


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench.lanes", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bulk", type=int, default=400, help="backlog requests submitted before the probes")
    parser.add_argument("--probes", type=int, default=20)
    parser.add_argument("--gap", type=float, default=0.1, help="seconds between probes")
    parser.add_argument("--words", type=int, default=20, help="prompt words = output tokens of the echo engine")
    parser.add_argument("--token-delay-ms", type=float, default=10)
    parser.add_argument("--batch-max-size", type=int, default=8)
    parser.add_argument("--bulk-max-share", type=float, default=0.375, help="LLMQ_BULK_MAX_SHARE of the worker")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = asyncio.run(main_async(args))
    print(f"\none worker, echo engine: {args.words} tokens at {args.token_delay_ms} ms/token, batches of <= "
          f"{args.batch_max_size}, bulk share {args.bulk_max_share} of {2 * args.batch_max_size} places; "
          f"{args.probes} interactive probes one at a time; {os.cpu_count()} CPUs")
    print(f"{'scenario':<24} {'backlog':>7} {'p50 s':>7} {'p95 s':>7} {'max s':>7} {'backlog done':>12} "
          f"{'in s':>6}")
    for r in results:
        print(f"{r.scenario:<24} {r.backlog:>7} {r.p50_s:>7.3f} {r.p95_s:>7.3f} {r.max_s:>7.3f} "
              f"{r.backlog_done_by_end:>12} {r.window_s:>6.1f}")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")


if __name__ == "__main__":
    main()
