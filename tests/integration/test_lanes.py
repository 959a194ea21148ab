"""Priority lanes on the real broker, Redis, gateway and worker (echo engine with
simulated generation time): an interactive request overtakes queued bulk work,
bulk still finishes under steady interactive load (the starvation guard), a
bulk request produced straight to the bulk topic is served as bulk, and the
HTTP `lane` field is validated."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime

from aiokafka import AIOKafkaProducer

from tests.integration.helpers import submit, wait_final, wait_until

# 30 words at 10 ms each: a bulk request holds an engine slot for about 0.3 s.
BULK_PROMPT = " ".join(f"w{i}" for i in range(30))
SHORT_PROMPT = "one two three four five"


async def _submit_many(http, base: str, bodies: list[dict], concurrency: int = 16) -> list[str]:
    gate = asyncio.Semaphore(concurrency)

    async def one(body):
        async with gate:
            return await submit(http, base, body)

    return list(await asyncio.gather(*(one(body) for body in bodies)))


def _at(view: dict, what: str) -> datetime:
    return datetime.fromisoformat(view["timings"][what])


async def test_an_interactive_request_overtakes_queued_bulk_work(settings, gateway, http, start_worker):
    # Two engine slots; 20 places, of which bulk may hold half: 2 running, 8 queued in the engine.
    worker = await start_worker(echo_token_delay_ms=10, batch_max_size=2, max_in_flight=20, bulk_max_share=0.5,
                                drain_seconds=1)
    bulk_ids = await _submit_many(http, gateway.url, [{"input": {"prompt": BULK_PROMPT}, "lane": "bulk"}] * 200)
    await wait_until(lambda: asyncio.sleep(0, worker.capacity.held_by["bulk"] == 10), 30, "bulk to fill its share")

    interactive = await submit(http, gateway.url, {"input": {"prompt": SHORT_PROMPT}})
    done = await wait_final(http, gateway.url, interactive)
    assert done["status"] == "succeeded" and done["lane"] == "interactive"

    bulk = [(await gateway.store.get(i)).model_dump(mode="json") for i in bulk_ids]
    assert {view["lane"] for view in bulk} == {"bulk"}
    # It did not wait for the bulk requests queued before it, in Kafka or in the engine:
    # while it was on its way and ran, only bulk requests already in the engine's slots
    # (two) finished, and one more whose slot freed before it got there.
    meanwhile = [v for v in bulk if v["timings"]["finished_at"]
                 and _at(done, "submitted_at") < _at(v, "finished_at") < _at(done, "finished_at")]
    assert len(meanwhile) <= 3, len(meanwhile)
    # Most of the bulk work was still unfinished when it was done.
    finished = [v for v in bulk if v["timings"]["finished_at"] and _at(v, "finished_at") < _at(done, "finished_at")]
    assert len(finished) < len(bulk) // 4, len(finished)
    assert worker.capacity.held_by["bulk"] <= 10  # bulk never held more than its share


async def test_bulk_still_finishes_under_steady_interactive_load(settings, gateway, http, start_worker):
    # Four places, two engine slots; an interactive request holds a slot for about 0.2 s.
    worker = await start_worker(echo_token_delay_ms=10, batch_max_size=2, max_in_flight=4, drain_seconds=1)
    busy = " ".join(f"i{i}" for i in range(20))
    submitted: list[str] = []
    backlog: list[int] = []  # interactive requests submitted and not finished, at each turn of the pump
    stop = asyncio.Event()

    async def pump():
        """Keeps more interactive requests unfinished than the worker may hold, all along."""
        while not stop.is_set():
            backlog.append(len(submitted) - worker.stats.results_written)
            if backlog[-1] < 12:
                submitted.append(await submit(http, gateway.url, {"input": {"prompt": busy}}))
            else:
                await asyncio.sleep(0.01)

    pumping = asyncio.create_task(pump())
    try:
        await wait_until(lambda: asyncio.sleep(0, worker.stats.results_written >= 10), 30, "interactive load")
        watched_from = len(backlog)
        bulk_ids = [await submit(http, gateway.url, {"input": {"prompt": SHORT_PROMPT}, "lane": "bulk"})
                    for _ in range(5)]
        bulk = [await wait_final(http, gateway.url, i, timeout=60) for i in bulk_ids]
        watched = backlog[watched_from:]
    finally:
        stop.set()
        await pumping
    assert [(v["status"], v["lane"]) for v in bulk] == [("succeeded", "bulk")] * 5
    assert worker.stats.fetched_bulk == 5
    # The interactive lane had requests waiting in Kafka (more unfinished than the worker
    # holds) the whole time the bulk ones were queued and served.
    assert min(watched) > 4, min(watched)


async def test_a_request_produced_to_the_bulk_topic_is_served_as_bulk(settings, gateway, http, start_worker):
    worker = await start_worker()
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap)
    await producer.start()
    try:
        for topic, request_id in ((settings.bulk_topic_name, "from-a-batch-job"), (settings.request_topic, "urgent")):
            message = {"v": 1, "id": request_id, "input": {"prompt": "a b c"}, "priority": 5}
            await producer.send_and_wait(topic, json.dumps(message).encode(), key=request_id.encode())
    finally:
        await producer.stop()

    bulk = await wait_final(http, gateway.url, "from-a-batch-job", not_yet_recorded=True)
    assert (bulk["status"], bulk["lane"], bulk["output"]["text"]) == ("succeeded", "bulk", "a b c")
    urgent = await wait_final(http, gateway.url, "urgent", not_yet_recorded=True)
    assert (urgent["status"], urgent["lane"]) == ("succeeded", "interactive")
    count = worker.metrics.registry.get_sample_value
    assert count("llmq_worker_fetched_total", {"lane": "bulk"}) == 1
    assert count("llmq_worker_fetched_total", {"lane": "interactive"}) == 1


async def test_http_lane_is_validated_and_shown(settings, gateway, http, start_worker):
    async with http.post(f"{gateway.url}/v1/requests", json={"input": {"prompt": "x"}, "lane": "urgent"}) as resp:
        assert resp.status == 422
        error = (await resp.json())["error"]
        assert error["field"] == "lane" and "interactive" in error["message"] and "bulk" in error["message"]
    async with http.post(f"{gateway.url}/v1/requests", json={"input": {"prompt": "x"}, "lane": 1}) as resp:
        assert resp.status == 422 and (await resp.json())["error"]["field"] == "lane"

    # Refused ones left nothing behind; accepted ones say their lane, queued and once served.
    bulk = await submit(http, gateway.url, {"input": {"prompt": "low priority"}, "lane": "bulk"})
    interactive = await submit(http, gateway.url, {"input": {"prompt": "now please"}})
    async with http.get(f"{gateway.url}/v1/requests/{bulk}") as resp:
        assert (await resp.json())["lane"] == "bulk"
    worker = await start_worker()
    assert (await wait_final(http, gateway.url, bulk))["lane"] == "bulk"
    assert (await wait_final(http, gateway.url, interactive))["lane"] == "interactive"
    assert (worker.stats.fetched, worker.stats.fetched_bulk) == (2, 1)  # the bulk one came from the bulk topic
