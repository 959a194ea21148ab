"""The floor of a gateway's work, for `bench.pipeline` to compare the llmq gateway against.

One aiohttp process whose POST handler does only what any gateway of this
design must: parse the JSON body, write ONE Redis HSET, produce ONE Kafka
message and wait for its ack, answer 202 JSON. No validation, no TTL, no
metrics, no middleware. It uses the same clients as llmq, configured the same
way (shared.store.connect_redis, shared.kafka.make_producer: same pool, same
acks and linger_ms from LLMQ_* settings), so the comparison measures llmq's
own per-request overhead rather than a difference in client set-up.

    python -m bench.baseline_gateway --port N      (LLMQ_* env as for `gateway`)
"""

from __future__ import annotations

import argparse
import json
import uuid

from aiohttp import web

from deploy.settings import StackSettings
from shared.kafka import JSON_HEADERS, ensure_topics, make_producer, start_with_retry
from shared.store import connect_redis


def build_app(settings: StackSettings) -> web.Application:
    app = web.Application()
    state: dict = {}

    async def start(_app: web.Application) -> None:
        state["redis"] = connect_redis(settings.redis_url)
        state["producer"] = make_producer(settings)
        await start_with_retry(state["producer"], "producer")
        await ensure_topics(settings)  # same partition count as the gateway's topic

    async def close(_app: web.Application) -> None:
        await state["producer"].stop()
        await state["redis"].aclose()

    async def submit(request: web.Request) -> web.Response:
        body = json.loads(await request.read())
        request_id = uuid.uuid4().hex
        await state["redis"].hset(f"{settings.redis_prefix}:req:{request_id}",
                                  mapping={"id": request_id, "status": "queued"})
        message = json.dumps({"id": request_id, **body}).encode()
        await state["producer"].send_and_wait(settings.request_topic, message,
                                              key=request_id.encode(), headers=JSON_HEADERS)
        return web.json_response({"id": request_id, "status": "queued"}, status=202)

    app.router.add_post("/v1/requests", submit)
    app.on_startup.append(start)
    app.on_cleanup.append(close)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(prog="baseline_gateway", description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    settings = StackSettings()
    web.run_app(build_app(settings), host="127.0.0.1", port=args.port, print=None, access_log=None,
                shutdown_timeout=2)


if __name__ == "__main__":
    main()
