"""The lag reader (what the scaler and queue admission read) on the real broker.
The dev broker answers ListOffsets(latest) with the base offset of the last
record batch + 1 after a produce request carrying several records; the reader
must still count every record, so these tests produce in batches."""

from __future__ import annotations

import asyncio

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from shared.kafka import ensure_topics
from shared.lag import LagReader
from tests.integration.helpers import wait_until


async def _produce_batched(settings, counts: dict[int, int]) -> None:
    """counts[partition] records, sent together so the producer batches them."""
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, linger_ms=50, enable_idempotence=False)
    await producer.start()
    try:
        sent = [await producer.send(settings.request_topic, b"{}", partition=p)
                for p, n in counts.items() for _ in range(n)]
        await asyncio.gather(*sent)
    finally:
        await producer.stop()


async def _depth_becomes(reader: LagReader, expected: int) -> list[int]:
    seen: list[int] = []

    async def right():
        seen.append((await reader.read()).depth)
        return seen[-1] == expected

    try:
        await wait_until(right, timeout=10, what=f"depth {expected}")
    except AssertionError:
        raise AssertionError(f"depth never read {expected}; read {seen[-5:]}") from None
    return seen


async def test_lag_counts_every_batched_record_and_follows_commits(settings):
    await ensure_topics(settings)
    reader = LagReader(settings)
    try:
        empty = await reader.read()
        assert empty.depth == 0 and empty.partition_count == settings.request_partitions

        await _produce_batched(settings, {0: 110, 1: 7, 2: 1})
        await _depth_becomes(reader, 118)

        # What ListOffsets alone says; on the dev broker it is short, which is the bug the reader avoids.
        probe = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap)
        await probe.start()
        try:
            listed = await probe.end_offsets([TopicPartition(settings.request_topic, p) for p in range(3)])
        finally:
            await probe.stop()
        print("ListOffsets(latest) on this broker:", {tp.partition: o for tp, o in listed.items()})

        # The workers' group commits part of partition 0 and all of partition 2.
        group = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, group_id=settings.consumer_group,
                                 enable_auto_commit=False)
        await group.start()
        try:
            group.assign([TopicPartition(settings.request_topic, p) for p in (0, 2)])
            await group.commit({TopicPartition(settings.request_topic, 0): 40,
                                TopicPartition(settings.request_topic, 2): 1})
        finally:
            await group.stop()
        reading = (await reader.read())
        by_partition = {p.tp.partition: p.lag for p in reading.partitions}
        assert by_partition == {0: 70, 1: 7, 2: 0, 3: 0}
        assert reading.depth == 77

        # More batched records on top of a committed offset.
        await _produce_batched(settings, {0: 30, 3: 12})
        await _depth_becomes(reader, 77 + 30 + 12)
    finally:
        await reader.close()


async def test_lag_of_a_topic_created_after_the_reader_started_counts_at_the_next_read(settings):
    """A scaler started on a fresh broker, before the gateway creates the request topic,
    sees the topic and its lag on its next read, not when its metadata next expires."""
    reader = LagReader(settings)
    try:
        reading = await reader.read()
        assert reading.depth == 0 and reading.partition_count == 0

        await ensure_topics(settings)
        await _produce_batched(settings, {0: 40, 1: 20})
        await _depth_becomes(reader, 60)  # within seconds; metadata expires only after 5 minutes
        assert (await reader.read()).partition_count == settings.request_partitions
    finally:
        await reader.close()


async def test_a_reader_trusting_list_offsets_would_be_wrong_here(settings):
    """Guards the test above: it only proves something if ListOffsets is short on this broker.
    On Apache Kafka the two agree and this test only checks the reader."""
    await ensure_topics(settings)
    await _produce_batched(settings, {0: 110})
    reader = LagReader(settings)
    try:
        await _depth_becomes(reader, 110)
        tp = TopicPartition(settings.request_topic, 0)
        listed = (await reader._ends.end_offsets([tp]))[tp]
        print(f"110 records batched: ListOffsets(latest) says {listed}, the reader says 110")
        assert listed <= 110
    finally:
        await reader.close()


async def test_one_read_gives_each_lanes_lag(settings):
    """The scaler reads both lanes in one read and weighs them apart."""
    await ensure_topics(settings)
    await _produce_batched(settings, {0: 3, 1: 4})
    await _produce_batched(settings.model_copy(update={"request_topic": settings.bulk_topic_name}), {0: 50, 2: 25})
    reader = LagReader(settings, settings.lane_topics)
    try:
        await _depth_becomes(reader, 82)
        reading = await reader.read()
        assert (reading.of(settings.request_topic).depth, reading.of(settings.bulk_topic_name).depth) == (7, 75)
        # Each topic's partitions are shared by the group's members: as many workers as one topic has.
        assert reading.partition_count == settings.request_partitions
    finally:
        await reader.close()
