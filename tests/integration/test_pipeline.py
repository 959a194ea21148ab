"""The backbone, end to end on the real broker and Redis: submit over HTTP or
straight to Kafka, a worker serves it, the result is read back over HTTP."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timedelta, timezone

from aiokafka import AIOKafkaProducer

from shared.schema import RequestMessage
from tests.integration.helpers import submit, wait_final, wait_until


async def test_http_request_succeeds_with_engine_output(gateway, http, start_worker):
    await start_worker()
    request_id = await submit(http, gateway.url, {"input": {"prompt": "Hello there queue"}, "params": {"max_tokens": 16}})

    view = await wait_final(http, gateway.url, request_id)

    assert view["status"] == "succeeded"
    assert view["output"] == {"text": "Hello there queue", "finish_reason": "stop"}
    assert view["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    assert view["attempts"] == 1
    timings = view["timings"]
    assert timings["submitted_at"] <= timings["started_at"] <= timings["finished_at"]
    assert timings["total_seconds"] >= timings["run_seconds"] >= 0


async def test_status_is_queued_until_a_worker_runs_it(gateway, http, start_worker):
    request_id = await submit(http, gateway.url, {"input": {"prompt": "wait for me"}})
    async with http.get(f"{gateway.url}/v1/requests/{request_id}") as resp:
        assert (await resp.json())["status"] == "queued"
    async with http.get(f"{gateway.url}/v1/requests/{request_id}", params={"wait": "0.3"}) as resp:
        assert (await resp.json())["status"] == "queued"  # the wait ran out: the unfinished record comes back

    await start_worker()
    assert (await wait_final(http, gateway.url, request_id))["status"] == "succeeded"


async def test_long_poll_returns_as_soon_as_the_result_is_written(gateway, http, start_worker):
    await start_worker(echo_token_delay_ms=100)
    request_id = await submit(http, gateway.url, {"input": {"prompt": "one two three"}})
    async with http.get(f"{gateway.url}/v1/requests/{request_id}", params={"wait": "20"}) as resp:
        view = await resp.json()
    assert view["status"] == "succeeded"
    assert view["output"]["text"] == "one two three"


async def test_max_tokens_and_stop_are_applied(gateway, http, start_worker):
    await start_worker()
    cut = await submit(http, gateway.url, {"input": {"prompt": "a b c d e f"}, "params": {"max_tokens": 2}})
    stopped = await submit(http, gateway.url, {"input": {"prompt": "keep this STOP not this"}, "params": {"stop": ["STOP"]}})
    assert (await wait_final(http, gateway.url, cut))["output"] == {"text": "a b", "finish_reason": "length"}
    assert (await wait_final(http, gateway.url, stopped))["output"] == {"text": "keep this ", "finish_reason": "stop"}


async def test_request_produced_straight_to_kafka_succeeds(settings, gateway, http, start_worker):
    await start_worker()
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap)
    await producer.start()
    try:
        message = {"v": 1, "id": "billing-svc:0001", "input": {"messages": [{"role": "user", "content": "hi there"}]},
                   "params": {"max_tokens": 8}, "metadata": {"team": "billing"}}
        await producer.send_and_wait(settings.request_topic, RequestMessage.model_validate(message).to_bytes(),
                                     key=b"billing-svc:0001")
    finally:
        await producer.stop()

    view = await wait_final(http, gateway.url, "billing-svc:0001", not_yet_recorded=True)

    assert view["status"] == "succeeded"
    assert view["output"]["text"] == "user: hi there"
    assert view["metadata"] == {"team": "billing"}
    assert view["model"] == "echo"  # the record says which model served it, though the message named none


async def test_a_model_no_worker_serves_is_refused_at_submit(gateway, http, start_worker):
    await start_worker()  # registers the model it serves: echo
    async with http.post(f"{gateway.url}/v1/requests", json={"model": "gpt-9", "input": {"prompt": "x"}}) as resp:
        assert resp.status == 422
        assert (await resp.json())["error"] == {"type": "model_not_found", "field": "model",
                                                "message": "model 'gpt-9' is not served here (served: echo)"}
    served = await submit(http, gateway.url, {"model": "echo", "input": {"prompt": "x"}})
    assert (await wait_final(http, gateway.url, served))["status"] == "succeeded"


async def test_a_message_for_another_model_fails_with_a_reason(settings, gateway, http, start_worker):
    """Produced straight to Kafka, past the gateway's check: the worker refuses it."""
    await start_worker()
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap)
    await producer.start()
    try:
        message = {"v": 1, "id": "for-gpt-9", "model": "gpt-9", "input": {"prompt": "x"}}
        await producer.send_and_wait(settings.request_topic, json.dumps(message).encode())
    finally:
        await producer.stop()
    view = await wait_final(http, gateway.url, "for-gpt-9", not_yet_recorded=True)
    assert view["status"] == "failed"
    assert view["error"]["type"] == "model_not_found"
    assert view["output"] is None


async def test_cancelled_while_queued_is_never_run(gateway, http, start_worker):
    request_id = await submit(http, gateway.url, {"input": {"prompt": "never run me"}})
    async with http.delete(f"{gateway.url}/v1/requests/{request_id}") as resp:
        assert resp.status == 200
        assert (await resp.json())["status"] == "cancelled"
    async with http.delete(f"{gateway.url}/v1/requests/{request_id}") as resp:
        assert resp.status == 200  # cancelling twice is fine

    after = await submit(http, gateway.url, {"input": {"prompt": "run me"}})
    worker = await start_worker()
    assert (await wait_final(http, gateway.url, after))["status"] == "succeeded"

    view = await wait_final(http, gateway.url, request_id)
    assert view["status"] == "cancelled"
    assert view["output"] is None
    assert view["attempts"] == 0
    assert worker.stats.skipped == 1 and worker.stats.succeeded == 1


async def test_cancel_of_a_finished_request_is_a_conflict(gateway, http, start_worker):
    await start_worker()
    request_id = await submit(http, gateway.url, {"input": {"prompt": "done soon"}})
    await wait_final(http, gateway.url, request_id)
    async with http.delete(f"{gateway.url}/v1/requests/{request_id}") as resp:
        assert resp.status == 409
        assert (await resp.json())["error"]["type"] == "already_finished"


async def test_a_deadline_that_passes_in_the_queue_is_not_run(gateway, http, start_worker):
    # Accepted while its deadline was ahead (one already past is refused at submit); no
    # worker takes it until the deadline has passed.
    deadline = datetime.now(timezone.utc) + timedelta(seconds=1)
    request_id = await submit(http, gateway.url, {"input": {"prompt": "too late"}, "deadline": deadline.isoformat()})
    await asyncio.sleep(1.5)
    worker = await start_worker()
    view = await wait_final(http, gateway.url, request_id)
    assert view["status"] == "expired"
    assert view["error"]["type"] == "deadline_exceeded"
    assert worker.stats.expired == 1 and worker.stats.succeeded == 0


async def test_a_message_delivered_again_while_its_request_runs_does_not_run_it_twice(settings, gateway, http,
                                                                                    start_worker):
    """Kafka delivers at least once: a producer's retry, or a rebalance that hands a partition
    to another worker, brings a message back while the first run is still going. The live
    run's lease keeps the second delivery waiting; it then sees the result and skips."""
    worker = await start_worker(echo_token_delay_ms=50)
    message = {"v": 1, "id": "twice", "input": {"prompt": " ".join(["word"] * 40)}, "params": {"max_tokens": 40}}
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap)
    await producer.start()
    try:
        for _ in range(2):
            await producer.send_and_wait(settings.request_topic, json.dumps(message).encode(), key=b"twice")
    finally:
        await producer.stop()

    view = await wait_final(http, gateway.url, "twice", not_yet_recorded=True)
    assert view["status"] == "succeeded" and view["attempts"] == 1
    await wait_until(lambda: _true(worker.offsets.in_flight == 0), what="both deliveries to be done")
    assert worker.stats.results_written == 1 and worker.stats.skipped == 1


async def _true(value: bool) -> bool:
    return value


async def test_two_workers_share_200_requests_each_run_exactly_once(gateway, http, start_worker):
    first = await start_worker(name="w1")
    second = await start_worker(name="w2")
    ids = await asyncio.gather(*(submit(http, gateway.url, {"input": {"prompt": f"request {i}"}}) for i in range(200)))

    views = await asyncio.gather(*(wait_final(http, gateway.url, i) for i in ids))

    assert [v["status"] for v in views] == ["succeeded"] * 200
    assert sorted(v["output"]["text"] for v in views) == sorted(f"request {i}" for i in range(200))
    assert first.stats.results_written + second.stats.results_written == 200
    assert first.stats.results_written > 0 and second.stats.results_written > 0
    assert all(v["attempts"] == 1 for v in views)


async def test_requests_succeed_after_redis_forgets_its_scripts(gateway, http, start_worker):
    # A Redis restart (or SCRIPT FLUSH) drops the Lua scripts; gateway and worker load them again.
    await start_worker()
    first = await submit(http, gateway.url, {"input": {"prompt": "before the flush"}})
    assert (await wait_final(http, gateway.url, first))["status"] == "succeeded"
    await gateway.redis.script_flush()
    second = await submit(http, gateway.url, {"input": {"prompt": "after the flush"}})
    view = await wait_final(http, gateway.url, second)
    assert view["status"] == "succeeded" and view["output"]["text"] == "after the flush"
