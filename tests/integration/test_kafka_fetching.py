"""aiokafka's fetcher holds up every fetch to a broker while a partition it leads still
holds fetched records the application hasn't taken, for its `prefetch_backoff`. A worker
leaves bulk records there whenever bulk is at its share; shared/kafka.py shortens that
hold so an interactive record is fetched meanwhile. On the real broker: the same
consumer set-up with the hold long (what aiokafka's 100 ms does, stretched so the test
can see it without timing anything) keeps the interactive record back, and with
`shorten_prefetch_backoff` it arrives."""

from __future__ import annotations

import asyncio

from aiokafka import AIOKafkaConsumer, TopicPartition

from shared.kafka import make_producer, shorten_prefetch_backoff

BULK_RECORDS = 50


async def _interactive_fetched_behind_bulk(settings, hold_seconds: float | None) -> bool:
    """Bulk records fetched and left untaken, then one interactive record produced: whether
    asking for the interactive partition alone gets it within 3 s. `hold_seconds`: the
    fetcher's hold (None: shorten_prefetch_backoff's)."""
    bulk, interactive = TopicPartition(settings.bulk_topic_name, 0), TopicPartition(settings.request_topic, 0)
    producer = make_producer(settings)
    await producer.start()
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False,
                                auto_offset_reset="earliest", fetch_max_wait_ms=10)
    try:
        await asyncio.gather(*[await producer.send(bulk.topic, b"{}", partition=0) for _ in range(BULK_RECORDS)])
        consumer.assign([bulk, interactive])
        await consumer.start()
        if hold_seconds is None:
            assert shorten_prefetch_backoff(consumer)
        else:
            consumer._fetcher._prefetch_backoff = hold_seconds
        # The bulk records arrive in the fetcher (their high watermark comes with them), untaken.
        for _ in range(100):
            assert not await consumer.getmany(interactive, timeout_ms=50)
            if consumer.highwater(bulk) == BULK_RECORDS:
                break
        assert consumer.highwater(bulk) == BULK_RECORDS
        await (await producer.send(interactive.topic, b"interactive", partition=0))
        fetched = await consumer.getmany(interactive, timeout_ms=3000)
        return [r.value for r in fetched.get(interactive, [])] == [b"interactive"]
    finally:
        await consumer.stop()
        await producer.stop()


async def test_buffered_bulk_records_hold_up_the_interactive_fetch_without_it(settings):
    assert not await _interactive_fetched_behind_bulk(settings, hold_seconds=60)


async def test_shortened_hold_fetches_the_interactive_record_behind_buffered_bulk(settings):
    assert await _interactive_fetched_behind_bulk(settings, hold_seconds=None)
