"""Which offsets a consumer may commit when its messages finish out of order.

A worker's requests finish out of order (the engine schedules per decoding step,
so a short one overtakes a long one), and so do a webhook sender's deliveries
(one request's retries don't hold up another's), so a partition is committed
only up to its lowest unfinished offset: a consumer that dies loses nothing, at
the price of redelivering some finished messages, which the Redis record then
shows as done.
"""

from __future__ import annotations

from collections.abc import Iterable

import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError

log = structlog.get_logger(__name__)


class OffsetTracker:
    def __init__(self) -> None:
        self._unfinished: dict[TopicPartition, set[int]] = {}
        self._next: dict[TopicPartition, int] = {}  # one past the highest offset seen
        self._committed: dict[TopicPartition, int] = {}

    def track(self, tp: TopicPartition, offset: int) -> None:
        self._unfinished.setdefault(tp, set()).add(offset)
        self._next[tp] = max(self._next.get(tp, 0), offset + 1)

    def finish(self, tp: TopicPartition, offset: int) -> None:
        self._unfinished.get(tp, set()).discard(offset)

    @property
    def in_flight(self) -> int:
        return sum(len(offsets) for offsets in self._unfinished.values())

    def committable(self) -> dict[TopicPartition, int]:
        """Per partition, the offset to commit (Kafka's "next to read"), where it moved."""
        out = {}
        for tp, next_offset in self._next.items():
            unfinished = self._unfinished.get(tp)
            offset = min(unfinished) if unfinished else next_offset
            if offset > self._committed.get(tp, -1):
                out[tp] = offset
        return out

    def committed(self, offsets: dict[TopicPartition, int]) -> None:
        self._committed.update(offsets)

    async def commit(self, consumer: AIOKafkaConsumer, what: str) -> None:
        """Commit each partition of `consumer` up to its lowest unfinished offset. A failed
        commit is logged (`{what}_commit_failed`) and not raised: partitions that moved to
        another member are read again from the last commit there (the records make it skip
        what finished here); a broker error is tried again at the next commit."""
        offsets = self.committable()
        if not offsets:
            return
        try:
            await consumer.commit(offsets)
            self.committed(offsets)
        except (CommitFailedError, IllegalStateError) as exc:
            log.warning(f"{what}_commit_failed", error=str(exc))
        except KafkaError as exc:
            log.warning(f"{what}_commit_failed_will_retry", error=str(exc))

    def forget(self, partitions: Iterable[TopicPartition]) -> None:
        """Drop partitions this worker no longer owns (after a rebalance)."""
        for tp in partitions:
            self._unfinished.pop(tp, None)
            self._next.pop(tp, None)
            self._committed.pop(tp, None)
