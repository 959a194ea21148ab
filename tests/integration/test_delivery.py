"""Delivery on the real broker: garbage goes to the dead-letter topic, and a
worker that dies mid-batch leaves its requests uncommitted for the next one."""

from __future__ import annotations

import json

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from tests.integration.helpers import committed_offsets, submit, wait_final, wait_until


async def _read_topic(settings, topic: str, count: int, timeout_ms: int = 15000) -> list:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=settings.kafka_bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    try:
        records = []
        while len(records) < count:
            batch = await consumer.getmany(timeout_ms=timeout_ms)
            if not batch:
                break
            records += [r for rs in batch.values() for r in rs]
        return records
    finally:
        await consumer.stop()


async def test_garbage_and_invalid_messages_go_to_the_dead_letter_topic(settings, gateway, http, start_worker):
    worker = await start_worker()
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(settings.request_topic, b"\xff\xfe not json at all", key=b"k", partition=0)
        await producer.send_and_wait(settings.request_topic, json.dumps({"v": 1, "id": "bad/id", "input": {}}).encode(),
                                     partition=0)
        await producer.send_and_wait(settings.request_topic, json.dumps({"v": 2, "id": "x", "input": {"prompt": "p"}}).encode(),
                                     partition=0)
        await producer.send_and_wait(settings.request_topic, None, key=b"tombstone", partition=0)
        good = {"v": 1, "id": "after-garbage", "input": {"prompt": "still serving"}}
        await producer.send_and_wait(settings.request_topic, json.dumps(good).encode(), partition=0)
    finally:
        await producer.stop()

    view = await wait_final(http, gateway.url, "after-garbage", not_yet_recorded=True)
    assert view["status"] == "succeeded" and view["output"]["text"] == "still serving"

    dead = await _read_topic(settings, settings.dlq_topic, 4)
    assert len(dead) == 4
    assert dead[0].value == b"\xff\xfe not json at all" and dead[0].key == b"k"
    reasons = [dict(r.headers)["llmq-dlq-reason"].decode() for r in dead]
    assert "Invalid JSON" in reasons[0]
    assert reasons[1].startswith("input")  # the first of its errors: input has no prompt
    assert reasons[2].startswith("v:")
    assert reasons[3] == "empty message"
    assert [dict(r.headers)["llmq-source"].decode() for r in dead] == [
        f"{settings.request_topic}/0/{offset}" for offset in range(4)
    ]
    assert worker.stats.dead_lettered == 4 and worker.stats.succeeded == 1


async def test_worker_killed_mid_batch_leaves_work_uncommitted_for_the_next(settings, gateway, http, start_worker,
                                                                           spawn_worker):
    # A worker process that takes 3 s per token, so it dies with the batch in hand.
    ids = [await submit(http, gateway.url, {"input": {"prompt": f"job {i} of five"}}) for i in range(5)]
    slow = settings.model_copy(update={"echo_token_delay_ms": 3000})
    proc = spawn_worker(slow)
    try:
        async def all_running():
            return [(await gateway.store.get(i)).status.value for i in ids] == ["running"] * 5

        await wait_until(all_running, timeout=60, what="the slow worker to start the batch")
    finally:
        proc.close()  # SIGKILL

    # Nothing it fetched was committed.
    committed = await committed_offsets(settings)
    assert all(offset in (None, 0) for offset in committed), committed

    # The next worker gets the partitions once the dead one's session times out, and finishes everything.
    worker = await start_worker()
    views = [await wait_final(http, gateway.url, i, timeout=60) for i in ids]
    assert [v["status"] for v in views] == ["succeeded"] * 5
    assert [v["attempts"] for v in views] == [2] * 5
    assert worker.stats.results_written == 5


async def test_a_reply_too_large_for_the_broker_fails_alone_and_the_worker_keeps_serving(settings, gateway, http,
                                                                                         start_worker):
    """A reply Kafka refuses for good (over the 1 MB a producer may send) is not retried for
    ever: the result stays readable, the failure is counted, and the next requests' replies flow."""
    worker = await start_worker(max_prompt_chars=2_000_000)  # a deployment that takes such prompts
    replies = f"{settings.request_topic}.replies"
    # Another service, allowed larger messages than llmq's own producer.
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, max_request_size=4_000_000)
    await producer.start()
    try:
        huge = "x" * 1_200_000  # one "token" for the echo engine, echoed back whole
        for request_id, prompt in (("too-large", huge), ("normal", "a small reply")):
            message = {"v": 1, "id": request_id, "input": {"prompt": prompt}, "reply_topic": replies}
            await producer.send_and_wait(settings.request_topic, json.dumps(message).encode(), partition=0)
    finally:
        await producer.stop()

    view = await wait_final(http, gateway.url, "too-large", not_yet_recorded=True)
    assert view["status"] == "succeeded" and len(view["output"]["text"]) == 1_200_000
    assert (await wait_final(http, gateway.url, "normal", not_yet_recorded=True))["status"] == "succeeded"
    [reply] = await _read_topic(settings, replies, 1)
    assert json.loads(reply.value)["id"] == "normal"
    assert worker.stats.replies_failed == 1

    later = await submit(http, gateway.url, {"input": {"prompt": "still serving"}})
    assert (await wait_final(http, gateway.url, later))["status"] == "succeeded"


async def test_a_message_over_the_deployments_limits_fails_as_it_would_over_http(settings, gateway, http,
                                                                                 start_worker):
    await start_worker(max_prompt_chars=20)
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap)
    await producer.start()
    try:
        for request_id, body in (("too-many-tokens", {"input": {"prompt": "hi"}, "params": {"max_tokens": 100000}}),
                                 ("too-long", {"input": {"prompt": "x" * 21}}),
                                 ("fits", {"input": {"prompt": "just right"}})):
            await producer.send_and_wait(settings.request_topic, json.dumps({"v": 1, "id": request_id, **body}).encode())
    finally:
        await producer.stop()

    tokens = await wait_final(http, gateway.url, "too-many-tokens", not_yet_recorded=True)
    assert tokens["status"] == "failed"
    assert (tokens["error"]["type"], tokens["error"]["message"]) == (
        "invalid_request", "params.max_tokens: must be at most 4096")
    long = await wait_final(http, gateway.url, "too-long", not_yet_recorded=True)
    assert long["status"] == "failed"
    assert (long["error"]["type"], long["error"]["message"]) == (
        "prompt_too_large", "the prompt is over the limit of 20 characters")
    assert (await wait_final(http, gateway.url, "fits", not_yet_recorded=True))["status"] == "succeeded"
