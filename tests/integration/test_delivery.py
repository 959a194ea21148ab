"""Delivery on the real broker: garbage goes to the dead-letter topic, and a
worker that dies mid-batch leaves its requests uncommitted for the next one."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from deploy.devstack import python_env
from tests.integration.helpers import submit, wait_final, wait_until


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


async def test_worker_killed_mid_batch_leaves_work_uncommitted_for_the_next(settings, gateway, http, start_worker):
    # A worker process that takes 3 s per token, so it dies with the batch in hand.
    ids = [await submit(http, gateway.url, {"input": {"prompt": f"job {i} of five"}}) for i in range(5)]
    slow = settings.model_copy(update={"echo_token_delay_ms": 3000})
    proc = subprocess.Popen([sys.executable, "-m", "workers.main"], env=python_env(**slow.to_env()),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        async def all_running():
            return [(await gateway.store.get(i)).status.value for i in ids] == ["running"] * 5

        await wait_until(all_running, timeout=60, what="the slow worker to start the batch")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    # Nothing it fetched was committed.
    probe = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, group_id=settings.consumer_group,
                             enable_auto_commit=False)
    await probe.start()
    try:
        committed = [await probe.committed(TopicPartition(settings.request_topic, p))
                     for p in range(settings.request_partitions)]
    finally:
        await probe.stop()
    assert all(offset in (None, 0) for offset in committed), committed

    # The next worker gets the partitions once the dead one's session times out, and finishes everything.
    worker = await start_worker()
    views = [await wait_final(http, gateway.url, i, timeout=60) for i in ids]
    assert [v["status"] for v in views] == ["succeeded"] * 5
    assert [v["attempts"] for v in views] == [2] * 5
    assert worker.stats.results_written == 5
