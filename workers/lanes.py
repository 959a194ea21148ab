"""Priority lanes in a worker: what its next fetch may take from each lane, and
where a request of each lane goes in the engine's queue. Pure: no clients, no
clock; the fetch loop (worker.py) and the runner apply it.

Why two topics and a gate in the fetch loop: on Kafka a partition is a FIFO, so
a priority field inside one topic could only reorder what a worker has already
fetched, and an interactive request produced behind a thousand batch lines
would wait for them to be read. With one topic per lane the consumer chooses
what to read next, as Kafka's consumer flow control intends (pause a topic,
read another first): interactive partitions are read whenever the worker has
room, bulk ones only while the interactive lane has nothing waiting for this
worker (its positions are at the high watermarks its fetches report). Both
topics stay in one consumer group, so lag, commits, rebalances and redelivery
work for bulk exactly as for interactive.

Three bounds keep that honest:
  - bulk holds at most LLMQ_BULK_MAX_SHARE of the in-flight places, so an
    interactive request arriving in the middle of a batch is fetched at once;
  - in the engine, every queued interactive request starts before every queued
    bulk one (its priority is moved past the whole interactive range), and a
    request's own `priority` still orders it within its lane;
  - the starvation guard: while the bulk lane has waiting work, it keeps
    LLMQ_BULK_MIN_IN_FLIGHT requests in flight however busy interactive is;
    their places are held back from interactive fetches, and they queue in the
    engine as interactive requests do, behind those already waiting and ahead
    of those that come later.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from shared.schema import Lane
from shared.settings import ServiceSettings

# RequestSpec.priority spans -1000..1000; a bulk request's engine priority is its own
# plus this, so it sorts after every interactive one and in its own order among bulk.
BULK_PRIORITY_OFFSET = 2001
LANES: tuple[Lane, ...] = ("interactive", "bulk")


def lane_of(topic: str, settings: ServiceSettings) -> Lane:
    """The lane of a record, by the topic it came from."""
    return "bulk" if topic == settings.bulk_topic_name else "interactive"


def engine_priority(lane: Lane, priority: int, guarded: bool = False) -> int:
    """Where a request queues in the engine (lower first). A bulk request within the
    starvation guard's minimum queues as an interactive one would."""
    return priority + BULK_PRIORITY_OFFSET if lane == "bulk" and not guarded else priority


@dataclass(frozen=True)
class FetchRoom:
    """The most records of each lane the next fetch may take."""

    interactive: int
    bulk: int


@dataclass(frozen=True)
class LanePolicy:
    bulk_max: int  # most bulk requests held at once
    bulk_min: int  # bulk requests kept in flight while bulk has waiting work (the guard)

    @classmethod
    def of(cls, limit: int, bulk_max_share: float, bulk_min_in_flight: int) -> LanePolicy:
        # At least one place for bulk, and at least one left for interactive where there are two.
        # The guard never holds the last place: a worker of one place serves bulk only while
        # interactive is idle, rather than keep its one place from interactive work.
        bulk_max = max(1, min(math.floor(limit * bulk_max_share), limit - 1))
        return cls(bulk_max=bulk_max, bulk_min=min(bulk_min_in_flight, bulk_max, limit - 1))

    def room(self, free: int, bulk_held: int, interactive_waiting: bool, bulk_waiting: bool) -> FetchRoom:
        """How the `free` in-flight places may be filled now.

        1) The guard's places (its minimum, less the bulk requests held) are kept for
           bulk while bulk has waiting work: interactive may take the rest.
        2) Bulk may take up to its share while interactive has nothing waiting, and
           only the guard's places while it has.
        """
        guard = max(0, self.bulk_min - bulk_held) if bulk_waiting else 0
        kept = min(guard, free)
        bulk = kept if interactive_waiting else max(0, min(self.bulk_max - bulk_held, free))
        return FetchRoom(interactive=free - kept, bulk=bulk)
