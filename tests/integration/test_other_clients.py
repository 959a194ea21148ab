"""Another service's Kafka client against llmq: confluent-kafka (librdkafka, the
client most non-Python services use) produces requests onto the request topic
and reads the dead-letter topic, as a billing service or a data pipeline would."""

from __future__ import annotations

import asyncio
import json
import time

from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from tests.integration.helpers import wait_final


def _produce(settings, messages: list[tuple[bytes, bytes]]) -> None:
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, "acks": "all"})
    failures: list[str] = []
    for key, value in messages:
        producer.produce(settings.request_topic, value=value, key=key,
                         headers=[("content-type", b"application/json")],
                         on_delivery=lambda err, _msg: failures.append(str(err)) if err else None)
    assert producer.flush(15) == 0, "undelivered messages"
    assert failures == []


def _read(settings, topic: str, count: int, timeout: float = 20) -> list:
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": f"{topic}-reader",
                         "enable.auto.commit": False})
    consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])  # the dead-letter topic has one partition
    try:
        got = []
        deadline = time.monotonic() + timeout
        while len(got) < count and time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is not None and message.error() is None:
                got.append(message)
        return got
    finally:
        consumer.close()


async def test_a_librdkafka_service_produces_requests_and_reads_the_dead_letter_topic(settings, gateway, http,
                                                                                        start_worker):
    await start_worker()
    request = {"v": 1, "id": "pipeline:42", "input": {"prompt": "from another service"}, "params": {"max_tokens": 8}}
    await asyncio.to_thread(_produce, settings, [(b"pipeline:42", json.dumps(request).encode()),
                                                 (b"pipeline:43", b'{"v": 1, "id": "pipeline:43"}')])

    view = await wait_final(http, gateway.url, "pipeline:42", not_yet_recorded=True)
    assert view["status"] == "succeeded" and view["output"]["text"] == "from another service"

    [dead] = await asyncio.to_thread(_read, settings, settings.dlq_topic, 1)
    assert dead.key() == b"pipeline:43" and dead.value() == b'{"v": 1, "id": "pipeline:43"}'
    headers = dict(dead.headers())
    assert headers["llmq-dlq-reason"].decode().startswith("input: Field required")
    assert headers["llmq-source"].decode().startswith(f"{settings.request_topic}/")
