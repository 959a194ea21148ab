"""Queue depth: the worker group's lag on the request topic(s); one read covers
both lanes (the request and bulk topics), and `LagReading.of(topic)` splits it.

Per partition: log end offset - committed offset (no committed offset: count
from the log start, what is still retained), summed. Workers commit only
finished requests, so the lag counts both the queued requests and those in
flight in workers.

The log end is the larger of two readings, because the dev broker (Tansu)
answers ListOffsets(latest) wrongly after a produce request carrying several
records (base offset of the last batch + 1: 110 records batched read as 1 or
11), while the high watermark in its fetch responses is right. On Apache
Kafka both agree. The high watermark comes from a group-less consumer
assigned to every partition and parked at the end of each: its fetches
return no records, only the high watermark, so reading lag costs no data.
"""

from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import dataclass

import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition

from shared.kafka import connection_options, start_with_retry
from shared.settings import ServiceSettings

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class PartitionLag:
    tp: TopicPartition
    start: int  # log start offset (oldest retained)
    end: int  # log end offset (next offset to be written)
    committed: int | None  # the group's committed offset, None if never committed

    @property
    def lag(self) -> int:
        consumed_up_to = self.start if self.committed is None else max(self.committed, self.start)
        return max(0, self.end - consumed_up_to)


@dataclass(frozen=True)
class LagReading:
    partitions: list[PartitionLag]

    @property
    def depth(self) -> int:
        return sum(p.lag for p in self.partitions)

    @property
    def partition_count(self) -> int:
        """The most partitions of any one topic read: the most workers that can each
        own a partition of it (the group's members share each topic's partitions)."""
        per_topic = collections.Counter(p.tp.topic for p in self.partitions)
        return max(per_topic.values(), default=0)

    def of(self, topic: str) -> LagReading:
        """The reading of one topic (one lane) alone."""
        return LagReading([p for p in self.partitions if p.tp.topic == topic])


class LagReader:
    """Reads the lag of `settings.consumer_group` on `topics` (default: the request topic)."""

    def __init__(self, settings: ServiceSettings, topics: list[str] | None = None,
                 highwater_timeout_seconds: float = 2.0) -> None:
        self.settings = settings
        self.topics = topics or [settings.request_topic]
        self.highwater_timeout = highwater_timeout_seconds
        self.reads = 0
        self.stale_highwater = 0  # reads where some partition's fetch did not answer in time
        # Group member that never subscribes or joins: committed offsets, metadata, ListOffsets.
        self._offsets = AIOKafkaConsumer(**connection_options(settings), group_id=settings.consumer_group,
                                         enable_auto_commit=False)
        # Group-less consumer parked at the end of each partition, for high watermarks.
        self._ends = AIOKafkaConsumer(**connection_options(settings), group_id=None,
                                      enable_auto_commit=False, auto_offset_reset="latest",
                                      fetch_max_wait_ms=100, max_partition_fetch_bytes=1024, fetch_max_bytes=16384)
        self._assigned: list[TopicPartition] = []
        self._started = False
        self._closed = False

    async def start(self) -> None:
        if self._started:
            return
        await start_with_retry(self._offsets, "lag-offsets")
        await start_with_retry(self._ends, "lag-ends")
        self._started = True

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._started:
            await self._ends.stop()
            await self._offsets.stop()

    async def read(self) -> LagReading:
        await self.start()
        self.reads += 1
        # 1) partitions: from metadata, refreshed so that new partitions count
        tps = await self._partitions()
        if not tps:
            return LagReading([])
        # 2) log start and ListOffsets(latest), one request each
        starts = await self._offsets.beginning_offsets(tps)
        listed_ends = await self._offsets.end_offsets(tps)
        # 3) the high watermark from fresh fetch responses
        highwaters = await self._highwaters(tps, listed_ends)
        # 4) the group's committed offsets
        committed = await asyncio.gather(*(self._offsets.committed(tp) for tp in tps))
        return LagReading([
            PartitionLag(tp, starts[tp], max(listed_ends[tp], highwaters.get(tp) or 0), offset)
            for tp, offset in zip(tps, committed)
        ])

    async def _partitions(self) -> list[TopicPartition]:
        # Metadata and offsets go through the other client: a fetch parked at the end
        # holds its connection for fetch_max_wait_ms on the dev broker. Refreshed on every
        # read, so a topic created (or grown) after start-up counts at once: the consumer
        # otherwise answers partitions_for_topic from metadata up to metadata_max_age_ms
        # (5 min) old, and has no public call that refreshes it (topics() fetches fresh
        # metadata but keeps it to itself).
        await self._offsets._client.force_metadata_update()
        tps = sorted(
            (TopicPartition(topic, p) for topic in self.topics
             for p in (self._offsets.partitions_for_topic(topic) or ())),
            key=lambda tp: (tp.topic, tp.partition),
        )
        if tps != self._assigned:
            self._ends.assign(tps)
            self._assigned = tps
        return tps

    async def _highwaters(self, tps: list[TopicPartition], listed_ends: dict[TopicPartition, int]) -> dict:
        """The high watermark of each partition, from a fetch answered after this call began.

        Each partition is parked (seek) at the best end known; moving it drops
        any records a previous fetch returned and starts a fresh fetch, whose
        answer carries the high watermark.
        """
        asked_at_ms = int(time.time() * 1000)
        for tp in tps:
            offset = max(listed_ends[tp], self._ends.highwater(tp) or 0)
            self._ends.seek(tp, offset)
        deadline = time.monotonic() + self.highwater_timeout
        pending = set(tps)
        while pending and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
            pending = {tp for tp in pending if (self._ends.last_poll_timestamp(tp) or 0) < asked_at_ms}
        if pending:
            self.stale_highwater += 1
            log.warning("lag_highwater_stale", partitions=len(pending))
        return {tp: self._ends.highwater(tp) for tp in tps}
