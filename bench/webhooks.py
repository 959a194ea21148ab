"""Webhook delivery benchmark: deliveries per second, and the lag from a request's
completion (its record's `finished_at`) to its `completed` event reaching a receiver.

    python -m bench.webhooks [--requests 2000] [--concurrency 64] [--json out.json]

Alone, it starts its own broker (Tansu) and redis-server on free ports, and one
gateway (with its webhook sender) and one echo worker in this process, with
LLMQ_WEBHOOK_ALLOW_PRIVATE=true (the receiver is on 127.0.0.1). `measure()` is
what another benchmark calls against a stack it runs (bench/batch.py): give it
the gateway's URL; that gateway's deployment must allow private addresses.
Every delivery's signature is verified, as a receiver would. A benchmark, never
part of the tests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from aiohttp import web
from standardwebhooks import Webhook

from bench.pipeline import ms, percentile


class _Receiver:
    """Answers 200 to each delivery and notes when each verified one came."""

    def __init__(self, secret: str) -> None:
        self.webhook = Webhook(secret)
        self.arrived: dict[str, tuple[float, dict]] = {}  # request id -> (when, payload)
        self.bad_signatures = 0
        self.all_in = asyncio.Event()
        self.expected = 0

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        now = time.time()
        try:
            payload = self.webhook.verify(body, dict(request.headers))
        except Exception:  # noqa: BLE001 - counted: a benchmark reports, it does not stop
            self.bad_signatures += 1
            return web.Response(status=400)
        self.arrived.setdefault(payload["data"]["id"], (now, payload))
        if len(self.arrived) >= self.expected:
            self.all_in.set()
        return web.Response(status=200)


async def _serve(receiver: _Receiver) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_post("/hook", receiver.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    return runner, f"http://{host}:{port}/hook"


async def measure(gateway_url: str, requests: int = 2000, concurrency: int = 64, api_key: str | None = None,
                  timeout: float = 600) -> dict:
    """Submit `requests` prompts asking for their `completed` event, and report the
    deliveries per second (first to last delivery) and the completion → delivery lag."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with aiohttp.ClientSession(headers=headers) as http:
        async with http.get(f"{gateway_url}/v1/webhooks/secret") as resp:
            resp.raise_for_status()
            receiver = _Receiver((await resp.json())["secret"])
        receiver.expected = requests
        runner, url = await _serve(receiver)
        try:
            slots = asyncio.Semaphore(concurrency)
            refused = 0

            async def submit(i: int) -> None:
                nonlocal refused
                body = {"input": {"prompt": f"webhook bench {i}"}, "params": {"max_tokens": 8},
                        "webhook": url, "webhook_events_filter": ["completed"]}
                async with slots, http.post(f"{gateway_url}/v1/requests", json=body) as resp:
                    refused += resp.status != 202

            started = time.time()
            await asyncio.gather(*(submit(i) for i in range(requests)))
            receiver.expected = requests - refused
            try:
                await asyncio.wait_for(receiver.all_in.wait(), timeout)
            except TimeoutError:
                pass
        finally:
            await runner.cleanup()
    lags = [when - _finished_at(payload) for when, payload in receiver.arrived.values()]
    arrivals = sorted(when for when, _ in receiver.arrived.values())
    window = arrivals[-1] - arrivals[0] if len(arrivals) > 1 else None
    return {
        "requests": requests, "refused": refused, "delivered": len(receiver.arrived),
        "bad_signatures": receiver.bad_signatures,
        "deliveries_per_second": round((len(arrivals) - 1) / window, 1) if window else None,
        "first_submit_to_last_delivery_seconds": round(arrivals[-1] - started, 3) if arrivals else None,
        "lag_p50_ms": ms(percentile(lags, 50)), "lag_p99_ms": ms(percentile(lags, 99)),
        "lag_max_ms": ms(max(lags) if lags else None),
    }


def _finished_at(payload: dict) -> float:
    from datetime import datetime

    return datetime.fromisoformat(payload["data"]["timings"]["finished_at"]).timestamp()


async def _alone(args: argparse.Namespace) -> dict:
    """A stack of its own: broker, Redis, one gateway and one echo worker in this process."""
    from deploy.devstack import free_port, start_broker, start_redis
    from deploy.settings import StackSettings
    from gateway.app import Gateway
    from shared.logs import configure_logging
    from workers.worker import Worker

    configure_logging("warning", "console")

    with tempfile.TemporaryDirectory() as tmp:
        broker = start_broker(free_port(), Path(tmp) / "broker.log")
        redis = start_redis(free_port(), Path(tmp) / "redis")
        try:
            settings = StackSettings(kafka_bootstrap=broker.url, redis_url=redis.url, engine="echo", auth=False,
                                     webhook_allow_private=True, metrics_port=0, log_level="warning",
                                     max_in_flight=args.concurrency * 2)
            gateway = Gateway(settings)
            runner = web.AppRunner(gateway.app, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            host, port = runner.addresses[0][:2]
            worker = Worker(settings)
            working = asyncio.create_task(worker.run())
            try:
                while not worker.assignment():
                    if working.done():
                        working.result()
                    await asyncio.sleep(0.1)
                return await measure(f"http://{host}:{port}", args.requests, args.concurrency)
            finally:
                worker.stop()
                await asyncio.gather(working, return_exceptions=True)
                await runner.cleanup()
        finally:
            broker.stop()
            redis.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.webhooks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args(argv)
    result = asyncio.run(_alone(args))
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["delivered"] == result["requests"] - result["refused"] and not result["bad_signatures"] else 1


if __name__ == "__main__":
    sys.exit(main())
