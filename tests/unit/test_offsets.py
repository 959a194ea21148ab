"""Commit each partition only up to its lowest unfinished offset."""

from aiokafka import TopicPartition

from shared.offsets import OffsetTracker

P0, P1 = TopicPartition("t", 0), TopicPartition("t", 1)


def test_out_of_order_finishes_commit_only_the_finished_prefix():
    tracker = OffsetTracker()
    for offset in (10, 11, 12):
        tracker.track(P0, offset)
    tracker.track(P1, 5)

    tracker.finish(P0, 12)  # the last one finishes first
    tracker.finish(P1, 5)
    assert tracker.committable() == {P0: 10, P1: 6}

    tracker.finish(P0, 10)
    assert tracker.committable() == {P0: 11, P1: 6}
    tracker.committed({P0: 11, P1: 6})
    assert tracker.committable() == {}  # nothing moved since

    tracker.finish(P0, 11)
    assert tracker.committable() == {P0: 13}
    assert tracker.in_flight == 0


def test_forgotten_partitions_are_not_committed():
    tracker = OffsetTracker()
    tracker.track(P0, 0)
    tracker.finish(P0, 0)
    tracker.forget([P0])
    assert tracker.committable() == {}
