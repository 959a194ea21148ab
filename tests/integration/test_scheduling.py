"""The worker over a continuous-batching engine, on the real broker and Redis:
a DELETE stops running work, offsets are committed only up to the lowest
unfinished request when requests finish out of order, the worker holds no
more than its limit, and a message that keeps killing workers is dead-lettered
after a bounded number of attempts."""

from __future__ import annotations

import json

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from tests.integration.helpers import committed_offsets, submit, wait_final, wait_until

LONG = " ".join(f"w{i}" for i in range(500))


@pytest.fixture(params=["echo", "torch"])
def engine_settings(request, tiny_model_dir):
    """Worker overrides giving a request that runs for seconds on each engine."""
    if request.param == "echo":
        return dict(engine="echo", echo_token_delay_ms=20), {"input": {"prompt": LONG}, "params": {"max_tokens": 500}}
    return (dict(engine="torch", model=str(tiny_model_dir), device="cpu"),
            {"input": {"prompt": "A queue is"}, "params": {"max_tokens": 1800, "temperature": 0}})


async def test_delete_stops_a_running_request_in_the_engine(settings, gateway, http, start_worker, engine_settings):
    overrides, long_body = engine_settings
    worker = await start_worker(**overrides)
    request_id = await submit(http, gateway.url, long_body)
    await wait_until(lambda: _has_tokens(worker, request_id), timeout=60, what="the request to be generating")

    async with http.delete(f"{gateway.url}/v1/requests/{request_id}") as resp:
        assert resp.status == 200 and (await resp.json())["status"] == "cancelled"

    await wait_until(lambda: _true(worker.stats.aborted == 1), timeout=30, what="the engine to abort it")
    view = await wait_final(http, gateway.url, request_id)
    assert view["status"] == "cancelled" and view["output"] is None
    # The worker goes on serving.
    short = await submit(http, gateway.url, {"input": {"prompt": "still here"}, "params": {"max_tokens": 4}})
    assert (await wait_final(http, gateway.url, short, timeout=60))["status"] == "succeeded"
    assert worker.stats.results_written == 1
    # The cancelled request is counted, by its final status, beside the one that succeeded.
    count = worker.metrics.registry.get_sample_value
    assert count("llmq_worker_requests_total", {"status": "cancelled"}) == 1
    assert count("llmq_worker_requests_total", {"status": "succeeded"}) == 1


async def _has_tokens(worker, request_id) -> bool:
    return request_id in worker.runner.running and worker.engine.running > 0


async def _true(value: bool) -> bool:
    return value


async def _committed(settings) -> int | None:
    return (await committed_offsets(settings))[0]


async def test_out_of_order_finishes_commit_only_up_to_the_lowest_unfinished(settings, gateway, http, start_worker):
    worker = await start_worker(echo_token_delay_ms=20)
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap)
    await producer.start()
    try:
        for request_id, prompt in (("slow", LONG), ("quick", "two words")):
            message = {"v": 1, "id": request_id, "input": {"prompt": prompt}, "params": {"max_tokens": 500}}
            await producer.send_and_wait(settings.request_topic, json.dumps(message).encode(), partition=0)
    finally:
        await producer.stop()

    quick = await wait_final(http, gateway.url, "quick", not_yet_recorded=True)
    assert quick["status"] == "succeeded"
    assert (await gateway.store.get("slow")).status.value == "running"  # overtaken
    await wait_until(lambda: _true(worker.offsets.in_flight == 1), what="the quick one's offset to be done")
    await worker.results.commit()
    # Offset 1 is finished but offset 0 is not: committing 2 would lose "slow" if this worker died now.
    assert await _committed(settings) in (None, 0)

    assert (await wait_final(http, gateway.url, "slow"))["status"] == "succeeded"

    async def committed_past_both():
        return await _committed(settings) == 2

    await wait_until(committed_past_both, what="the commit to move past both")


async def test_worker_holds_no_more_than_its_limit_and_finishes_everything(settings, gateway, http, start_worker):
    worker = await start_worker(echo_token_delay_ms=10, batch_max_size=2, max_in_flight=3)
    ids = [await submit(http, gateway.url, {"input": {"prompt": f"request {i} " + "word " * 8}}) for i in range(20)]
    views = [await wait_final(http, gateway.url, i, timeout=60) for i in ids]
    assert [v["status"] for v in views] == ["succeeded"] * 20
    assert worker.stats.peak_in_flight == 3  # it filled up, and never went past
    assert worker.stats.fetched == 20


async def test_a_message_that_keeps_killing_workers_goes_to_the_dead_letter_topic(settings, gateway, http, start_worker,
                                                                                  spawn_worker):
    # LLMQ_MAX_ATTEMPTS=1: a request whose one start died with its worker is not run again.
    request_id = await submit(http, gateway.url, {"input": {"prompt": "poison " * 20}})
    doomed = settings.model_copy(update={"echo_token_delay_ms": 3000, "max_attempts": 1})
    proc = spawn_worker(doomed)
    try:
        async def running():
            return (await gateway.store.get(request_id)).status.value == "running"

        await wait_until(running, timeout=60, what="the first worker to start it")
    finally:
        proc.close()  # SIGKILL, as a poison message would

    worker = await start_worker(max_attempts=1)
    view = await wait_final(http, gateway.url, request_id, timeout=60)
    assert view["status"] == "failed" and view["attempts"] == 2
    assert view["error"]["type"] == "too_many_attempts"
    assert "LLMQ_MAX_ATTEMPTS=1" in view["error"]["message"]
    assert worker.stats.dead_lettered == 1

    consumer = AIOKafkaConsumer(settings.dlq_topic, bootstrap_servers=settings.kafka_bootstrap,
                                auto_offset_reset="earliest")
    await consumer.start()
    try:
        batch = await consumer.getmany(timeout_ms=15000)
    finally:
        await consumer.stop()
    [dead] = [r for records in batch.values() for r in records]
    assert json.loads(dead.value)["id"] == request_id
    assert "LLMQ_MAX_ATTEMPTS=1" in dict(dead.headers)["llmq-dlq-reason"].decode()
