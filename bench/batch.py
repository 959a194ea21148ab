"""Batch API benchmark: a big batch on the bulk lane beside interactive traffic.

    python -m bench.batch [--lines 10000] [--workers 2] [--rate 20] [--idle-seconds 15]
                          [--webhooks 2000] [--cache-requests 200] [--json out.json] [--keep]

One run starts its own broker (Tansu), redis-server, one `gateway` (LLMQ_AUTH=false)
and --workers echo `worker`s on free loopback ports. Then:

  idle     an interactive client (the official `openai` client, one non-streamed
           chat completion per call, open loop at --rate calls/s) runs alone for
           --idle-seconds: the latency it sees with no batch
  batch    a --lines-line chat batch is uploaded (`files.create`) and created
           (`batches.create`); the same interactive client runs until the batch
           is `completed`
  webhooks --webhooks requests, each asking for its `completed` webhook, delivered
           to a receiver in this process that verifies every signature
           (bench/webhooks.py; the stack allows loopback receivers)
  cache    --cache-requests greedy requests, each sent twice: a miss, then a
           result-cache hit (bench/cache.py)

Reported: batch lines/s (lines / first line started → last line finished);
interactive p50/p99 idle and during the batch, and their ratio; time from
`batches.create` to the first line running; time from the last line finishing
to `completed` (finalizing: the output file written); webhook deliveries per
second and the lag from a request's finish to its delivery (p50/p99); the answer
latency of a cache hit against a miss. The lines' times come from
their request records in Redis (started_at, finished_at), the batch's from its
hash. A benchmark, never part of the tests.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import sys
import time
import uuid
from pathlib import Path

import openai

from bench.cache import cache_latency
from bench.openai import served_models
from bench.pipeline import Children, console_script, llmq_env, log, machine, ms, percentile, run_and_report
from bench.webhooks import measure as webhook_delivery
from deploy.devstack import ServiceError, free_port, start_broker, start_redis, wait_for_port
from shared.keys import Keys
from shared.store import connect_redis


def start_stack(children: Children, tmp: Path, workers: int) -> tuple[str, dict]:
    """Broker, redis, one gateway and `workers` echo workers; (gateway URL, the stack's wiring)."""
    broker = start_broker(free_port(), tmp / "broker.log")
    children.services.append(broker)
    redis_service = start_redis(free_port(), tmp / "redis")
    children.services.append(redis_service)
    stack = {"run": uuid.uuid4().hex[:8], "bootstrap": broker.url, "redis_url": redis_service.url}
    port = free_port()
    env = {**llmq_env(stack, "batch", port), "LLMQ_FILES_DIR": str(tmp / "files"), "LLMQ_METRICS_PORT": "0",
           "LLMQ_WEBHOOK_ALLOW_PRIVATE": "true"}  # the webhook receiver is on 127.0.0.1
    gateway = children.spawn("gateway", console_script("gateway", "gateway.main"), env)
    for index in range(workers):
        children.spawn(f"worker-{index}", console_script("worker", "workers.main"), env)
    base = f"http://127.0.0.1:{port}"
    wait_for_port(port, 60, gateway, "gateway")
    deadline = time.monotonic() + 60
    while "echo" not in served_models(base):
        if time.monotonic() > deadline:
            raise ServiceError("no worker registered the echo model within 60 s")
        time.sleep(0.2)
    stack["prefix"] = env["LLMQ_REDIS_PREFIX"]
    return base, stack


class Interactive:
    """Open-loop chat completions at `rate` per second until stopped; latencies by send time."""

    def __init__(self, client: openai.AsyncOpenAI, rate: float) -> None:
        self.client = client
        self.rate = rate
        self.samples: list[tuple[float, float]] = []  # (sent at, seconds)
        self.errors = 0
        self._stop = asyncio.Event()

    async def _one(self, number: int) -> None:
        sent = time.time()
        try:
            await self.client.chat.completions.create(
                model="echo", messages=[{"role": "user", "content": f"interactive {number}"}], max_tokens=16)
            self.samples.append((sent, time.time() - sent))
        except openai.APIError:
            self.errors += 1

    async def run(self) -> None:
        calls: set[asyncio.Task] = set()
        started, number = time.monotonic(), 0
        while not self._stop.is_set():
            task = asyncio.create_task(self._one(number))
            calls.add(task)
            task.add_done_callback(calls.discard)
            number += 1
            delay = started + number / self.rate - time.monotonic()
            if delay > 0:
                try:
                    async with asyncio.timeout(delay):
                        await self._stop.wait()
                except TimeoutError:
                    pass
        await asyncio.gather(*calls)

    def stop(self) -> None:
        self._stop.set()

    def latencies(self, since: float = 0.0, until: float = float("inf")) -> list[float]:
        return [seconds for sent, seconds in self.samples if since <= sent <= until]


async def warm_up(client: openai.AsyncOpenAI, timeout: float = 90) -> None:
    """Until calls answer quickly: the workers have joined the group and the partitions
    are assigned (the first calls wait out the group's rebalances)."""
    log("warming up")
    deadline, quick = time.monotonic() + timeout, 0
    while quick < 20:
        if time.monotonic() > deadline:
            raise ServiceError(f"calls still slow after {timeout:g} s of warm-up")
        started = time.monotonic()
        await client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "warm"}],
                                             max_tokens=4)
        quick = quick + 1 if time.monotonic() - started < 0.25 else 0


def batch_file(lines: int) -> bytes:
    return b"".join(json.dumps({"custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions",
                                "body": {"model": "echo", "max_tokens": 16,
                                         "messages": [{"role": "user", "content": f"batch line {i}"}]}}).encode()
                    + b"\n" for i in range(lines))


async def line_times(stack: dict, batch_id: str, lines: int) -> tuple[float, float]:
    """(the first line's start, the last line's finish), from the lines' records."""
    redis = connect_redis(stack["redis_url"])
    keys = Keys(stack["prefix"])
    starts, finishes = [], []
    try:
        for first in range(0, lines, 1000):
            async with redis.pipeline(transaction=False) as pipe:
                for index in range(first, min(first + 1000, lines)):
                    pipe.hmget(keys.request(Keys.batch_line(batch_id, index)), "started_at", "finished_at")
                for started, finished in await pipe.execute():
                    if started:
                        starts.append(float(started))
                    if finished:
                        finishes.append(float(finished))
        return min(starts), max(finishes)
    finally:
        await redis.aclose()


async def batch_hash(stack: dict, batch_id: str) -> dict[str, str]:
    redis = connect_redis(stack["redis_url"])
    try:
        return await redis.hgetall(Keys(stack["prefix"]).batch(batch_id))
    finally:
        await redis.aclose()


async def measure(base: str, stack: dict, args: argparse.Namespace) -> dict:
    client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused: auth is off", max_retries=0)
    await warm_up(client)
    # 1) interactive alone
    log(f"idle: {args.rate:g} interactive calls/s for {args.idle_seconds:g} s")
    idle = Interactive(client, args.rate)
    runner = asyncio.create_task(idle.run())
    await asyncio.sleep(args.idle_seconds)
    idle.stop()
    await runner
    # 2) the batch, with the same interactive load until it completes
    log(f"batch: {args.lines} lines")
    upload = await client.files.create(file=("bench.jsonl", io.BytesIO(batch_file(args.lines))), purpose="batch")
    busy = Interactive(client, args.rate)
    runner = asyncio.create_task(busy.run())
    created_at = time.time()
    batch = await client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                        completion_window="24h")
    while batch.status not in ("completed", "failed", "cancelled", "expired"):
        await asyncio.sleep(0.5)
        batch = await client.batches.retrieve(batch.id)
    done_at = time.time()
    busy.stop()
    await runner
    await client.close()
    if batch.status != "completed":
        raise RuntimeError(f"the batch ended {batch.status}: {batch.errors}")
    first_started, last_finished = await line_times(stack, batch.id, args.lines)
    # 3) webhooks; 4) the result cache, on the same stack, the batch done
    log(f"webhooks: {args.webhooks} requests, each with its `completed` delivery")
    webhooks = await webhook_delivery(base, args.webhooks)
    log(f"cache: {args.cache_requests} misses and as many hits")
    cache = await cache_latency(base, args.cache_requests)
    completed_at = float((await batch_hash(stack, batch.id))["completed_at"])
    during = busy.latencies(created_at, done_at)
    quiet = idle.latencies()
    return {
        "lines": args.lines, "workers": args.workers, "rate": args.rate,
        "batch_lines_per_s": round(args.lines / (last_finished - first_started), 1),
        "batch_wall_s": round(completed_at - created_at, 2),
        "create_to_first_line_ms": ms(first_started - created_at),
        "last_line_to_completed_ms": ms(completed_at - last_finished),
        "interactive_idle": {"calls": len(quiet), "errors": idle.errors, "p50_ms": ms(percentile(quiet, 50)),
                             "p99_ms": ms(percentile(quiet, 99))},
        "interactive_during_batch": {"calls": len(during), "errors": busy.errors,
                                     "p50_ms": ms(percentile(during, 50)), "p99_ms": ms(percentile(during, 99)),
                                     # when the slowest calls were sent, from batches.create: which phase
                                     # (validation, enqueue, running, finalizing) they met
                                     "slowest": [{"sent_after_create_s": round(sent - created_at, 2),
                                                  "ms": ms(seconds)}
                                                 for sent, seconds in sorted(busy.samples, key=lambda x: -x[1])[:10]
                                                 if created_at <= sent <= done_at]},
        "phases_after_create_s": {"first_line_started": round(first_started - created_at, 2),
                                  "last_line_finished": round(last_finished - created_at, 2),
                                  "completed": round(completed_at - created_at, 2)},
        "counts": batch.request_counts.model_dump(),
        "webhooks": webhooks,
        "cache": cache,
        "machine": machine(),
    }


def report(result: dict) -> str:
    idle, busy = result["interactive_idle"], result["interactive_during_batch"]
    hooks, cache = result["webhooks"], result["cache"]

    def ratio(key: str) -> str:
        return f"{busy[key] / idle[key]:.2f}x" if idle[key] and busy[key] else "n/a"

    rows = [
        ("batch lines/s", f"{result['batch_lines_per_s']}", f"{result['lines']} lines, {result['workers']} echo workers"),
        ("batches.create → first line running", f"{result['create_to_first_line_ms']} ms", "validation + first chunk"),
        ("last line finished → completed", f"{result['last_line_to_completed_ms']} ms", "finalizing: output file"),
        ("interactive p50, idle / during batch", f"{idle['p50_ms']} / {busy['p50_ms']} ms", ratio("p50_ms")),
        ("interactive p99, idle / during batch", f"{idle['p99_ms']} / {busy['p99_ms']} ms", ratio("p99_ms")),
        ("interactive calls (errors), idle / during", f"{idle['calls']} ({idle['errors']}) / {busy['calls']} "
                                                      f"({busy['errors']})", f"{result['rate']:g} calls/s"),
    ]
    rows += [
        ("webhook deliveries/s", f"{hooks['deliveries_per_second']}",
         f"{hooks['delivered']} of {hooks['requests'] - hooks['refused']} delivered, "
         f"{hooks['bad_signatures']} bad signatures"),
        ("webhook lag after finish, p50 / p99", f"{hooks['lag_p50_ms']} / {hooks['lag_p99_ms']} ms",
         "record's finished_at → receiver"),
        ("cache hit / miss answer, p50", f"{cache['hit']['p50_ms']} / {cache['miss']['p50_ms']} ms",
         f"a miss takes {cache['miss_over_hit_p50']}x a hit"),
        ("cache hit / miss answer, p99", f"{cache['hit']['p99_ms']} / {cache['miss']['p99_ms']} ms",
         f"{cache['miss_over_hit_p99']}x"),
    ]
    lines = ["| measure | value | note |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.batch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=10_000, help="lines in the batch (10000)")
    parser.add_argument("--workers", type=int, default=2, help="echo workers (2)")
    parser.add_argument("--rate", type=float, default=20.0, help="interactive calls per second (20)")
    parser.add_argument("--idle-seconds", type=float, default=15.0, help="interactive alone first, seconds (15)")
    parser.add_argument("--webhooks", type=int, default=2000, help="requests with a webhook, after the batch (2000)")
    parser.add_argument("--cache-requests", type=int, default=200, help="cache misses, and as many hits (200)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (child logs)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def run(children: Children, tmp: Path) -> dict:
        base, stack = start_stack(children, tmp, args.workers)
        return asyncio.run(measure(base, stack, args))

    return run_and_report(run, report, args.json, args.keep)

if __name__ == "__main__":
    sys.exit(main())
