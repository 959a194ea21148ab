"""Result-cache benchmark: how long a client waits for an answer from the result
cache (a hit) against one that goes through the queue and a worker (a miss).

    python -m bench.cache [--requests N] [--json out.json]

Alone, it starts its own broker and redis-server, a gateway and one echo worker
(every other setting at its default), then, one request at a time, sends a
greedy request with a new prompt (a miss: queue, worker, result) and at once
the same request again (a hit), each as `POST /v1/requests` with `Prefer:
wait=30`: the time from sending it to the answer holding the final record.
Hits and misses alternate, so both meet the same machine. `cache_latency` is
what another benchmark calls with a stack of its own (bench/batch.py).
A benchmark, never part of the tests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from pathlib import Path

import aiohttp

from bench.pipeline import (
    Children,
    console_script,
    free_port,
    llmq_env,
    log,
    machine,
    ms,
    percentile,
    run_and_report,
    start_broker,
    start_redis,
    wait_accepting,
)

WAIT = {"Prefer": "wait=30", "Content-Type": "application/json"}


def greedy(prompt: str) -> bytes:
    return json.dumps({"input": {"prompt": prompt}, "params": {"max_tokens": 8, "temperature": 0}}).encode()


async def _answer(http: aiohttp.ClientSession, base: str, body: bytes, expect: str) -> float:
    """Seconds from sending the request to its final record; its Cache-Status must be `expect`."""
    started = time.perf_counter()
    async with http.post(f"{base}/v1/requests", data=body, headers=WAIT) as resp:
        record = await resp.json()
        took = time.perf_counter() - started
        status = resp.headers.get("Cache-Status")
    if resp.status != 200 or record.get("status") != "succeeded":
        raise RuntimeError(f"no final answer within the wait: {resp.status} {record}")
    if status != expect:
        raise RuntimeError(f"Cache-Status {status!r}, expected {expect!r} (is LLMQ_CACHE_TTL_SECONDS 0?)")
    return took


def _summary(seconds: list[float]) -> dict:
    return {"count": len(seconds), "p50_ms": ms(percentile(seconds, 50)), "p99_ms": ms(percentile(seconds, 99)),
            "mean_ms": ms(sum(seconds) / len(seconds)) if seconds else None}


async def cache_latency(base: str, requests: int = 200, warmup: int = 10, headers: dict | None = None) -> dict:
    """Answer latency of result-cache misses and hits on a running gateway `base` with a
    worker (auth: pass its `Authorization` in `headers`): `requests` pairs of a new greedy
    prompt and its repeat, one at a time, after `warmup` pairs not counted.
    Returns {"miss": {p50_ms, p99_ms, ...}, "hit": {...}, "miss_over_hit_p50", "miss_over_hit_p99"}."""
    run = uuid.uuid4().hex[:8]  # prompts no earlier run has cached
    misses, hits = [], []
    async with aiohttp.ClientSession(headers=headers) as http:
        for i in range(warmup + requests):
            body = greedy(f"cache bench {run} request {i}")
            miss = await _answer(http, base, body, "llmq; fwd=uri-miss")
            hit = await _answer(http, base, body, "llmq; hit")
            if i >= warmup:
                misses.append(miss)
                hits.append(hit)
    miss, hit = _summary(misses), _summary(hits)
    return {"miss": miss, "hit": hit,
            "miss_over_hit_p50": round(miss["p50_ms"] / hit["p50_ms"], 1),
            "miss_over_hit_p99": round(miss["p99_ms"] / hit["p99_ms"], 1)}


def run(args: argparse.Namespace, children: Children, tmp: Path) -> dict:
    log(f"starting broker and redis in {tmp}")
    broker = start_broker(free_port(), tmp / "broker.log")
    children.services.append(broker)
    redis = start_redis(free_port(), tmp / "redis")
    children.services.append(redis)
    stack = {"bootstrap": broker.url, "redis_url": redis.url, "run": uuid.uuid4().hex[:8]}
    port = free_port()
    env = llmq_env(stack, "cache", port)
    gateway = children.spawn("gateway", console_script("gateway", "gateway.main") + ["--port", str(port)], env)
    children.spawn("worker", console_script("worker", "workers.main"), env)
    base = f"http://127.0.0.1:{port}"
    wait_accepting(base, gateway, "gateway")
    log(f"measuring {args.requests} misses and {args.requests} hits, one at a time")
    return {"machine": machine(), "config": {"requests": args.requests, "engine": "echo", "workers": 1},
            "latency": asyncio.run(cache_latency(base, args.requests))}


def report(result: dict) -> str:
    latency = result["latency"]
    lines = [f"result cache, echo engine, 1 worker, {result['config']['requests']} requests each, one at a time",
             f"{'answer':<8}{'p50 ms':>10}{'p99 ms':>10}{'mean ms':>10}"]
    for side in ("miss", "hit"):
        row = latency[side]
        lines.append(f"{side:<8}{row['p50_ms']:>10}{row['p99_ms']:>10}{row['mean_ms']:>10}")
    lines.append(f"a miss takes {latency['miss_over_hit_p50']}x a hit at p50, {latency['miss_over_hit_p99']}x at p99")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.cache", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200, help="misses, and as many hits, measured (200)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (child logs)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_and_report(lambda children, tmp: run(args, children, tmp), report, args.json, args.keep,
                          prefix="llmq-bench-cache-")

if __name__ == "__main__":
    sys.exit(main())
