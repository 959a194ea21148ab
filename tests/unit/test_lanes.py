"""The worker's lane policy (workers/lanes.py): what each lane's fetch may take, and
where each lane's requests queue in the engine. Pure; the behaviour on the real
broker is tests/integration/test_lanes.py."""

from __future__ import annotations

import asyncio

import pytest

from shared.settings import ServiceSettings
from workers.engines.echo import PrioritySlots
from workers.lanes import FetchRoom, LanePolicy, engine_priority, lane_of


def test_bulk_share_and_guard_come_from_the_settings_within_the_limit():
    assert LanePolicy.of(64, 0.5, 1) == LanePolicy(bulk_max=32, bulk_min=1)
    assert LanePolicy.of(64, 1.0, 1).bulk_max == 63  # a place is always left for interactive
    # one place: bulk may still run, but the guard never keeps it from interactive work
    assert LanePolicy.of(1, 0.5, 1) == LanePolicy(bulk_max=1, bulk_min=0)
    assert LanePolicy.of(2, 0.5, 1) == LanePolicy(bulk_max=1, bulk_min=1)
    assert LanePolicy.of(8, 0.25, 5) == LanePolicy(bulk_max=2, bulk_min=2)  # the guard never exceeds the share


def test_interactive_idle_lets_bulk_fill_its_share_and_no_more():
    policy = LanePolicy(bulk_max=8, bulk_min=1)
    assert policy.room(free=16, bulk_held=0, interactive_waiting=False, bulk_waiting=True).bulk == 8
    assert policy.room(free=10, bulk_held=6, interactive_waiting=False, bulk_waiting=True).bulk == 2
    assert policy.room(free=8, bulk_held=8, interactive_waiting=False, bulk_waiting=True).bulk == 0
    assert policy.room(free=3, bulk_held=0, interactive_waiting=False, bulk_waiting=True).bulk == 3


def test_interactive_waiting_closes_bulk_but_for_the_guard():
    policy = LanePolicy(bulk_max=8, bulk_min=1)
    # bulk holds its minimum already: all the room is interactive's
    assert policy.room(free=5, bulk_held=1, interactive_waiting=True, bulk_waiting=True) == _room(5, 0)
    # bulk holds none and has work waiting: one place is kept for it
    assert policy.room(free=5, bulk_held=0, interactive_waiting=True, bulk_waiting=True) == _room(4, 1)
    assert policy.room(free=1, bulk_held=0, interactive_waiting=True, bulk_waiting=True) == _room(0, 1)
    # nothing waiting in bulk: nothing kept
    assert policy.room(free=5, bulk_held=0, interactive_waiting=True, bulk_waiting=False) == _room(5, 0)


def test_interactive_always_keeps_a_place():
    for limit in range(1, 10):
        for share in (0.1, 0.5, 1.0):
            policy = LanePolicy.of(limit, share, bulk_min_in_flight=limit)
            for bulk_held in range(policy.bulk_max + 1):
                free = limit - bulk_held
                room = policy.room(free, bulk_held, interactive_waiting=True, bulk_waiting=True)
                assert room.interactive >= 1 or free == 0, (limit, share, bulk_held)
                assert room.interactive + room.bulk >= min(free, 1)


def test_no_guard_means_bulk_only_while_interactive_is_idle():
    policy = LanePolicy(bulk_max=8, bulk_min=0)
    assert policy.room(free=5, bulk_held=0, interactive_waiting=True, bulk_waiting=True) == _room(5, 0)
    assert policy.room(free=5, bulk_held=0, interactive_waiting=False, bulk_waiting=True) == _room(5, 5)


@pytest.mark.parametrize("priority", [-1000, 0, 1000])
def test_every_interactive_request_queues_before_every_bulk_one(priority):
    assert engine_priority("interactive", 1000) < engine_priority("bulk", -1000)
    assert engine_priority("interactive", priority) == priority
    # a request's own priority still orders it within its lane
    assert engine_priority("bulk", priority) < engine_priority("bulk", priority + 1)
    # within the guard's minimum, bulk queues as interactive does
    assert engine_priority("bulk", priority, guarded=True) == priority


async def test_in_the_echo_engine_a_freed_slot_goes_to_interactive_before_earlier_bulk():
    slots = PrioritySlots(1)
    await slots.acquire(0)  # the running request
    order = []

    async def wait(name, lane, priority):
        await slots.acquire(engine_priority(lane, priority))
        order.append(name)
        slots.release()

    waiters = [asyncio.create_task(wait("bulk-a", "bulk", -5)), asyncio.create_task(wait("bulk-b", "bulk", 0))]
    await asyncio.sleep(0)
    waiters.append(asyncio.create_task(wait("interactive", "interactive", 7)))
    await asyncio.sleep(0)
    slots.release()
    await asyncio.gather(*waiters)
    assert order == ["interactive", "bulk-a", "bulk-b"]


def test_a_records_lane_is_its_topic():
    settings = ServiceSettings(request_topic="t")
    assert (lane_of("t", settings), lane_of("t.bulk", settings)) == ("interactive", "bulk")
    assert lane_of("b", ServiceSettings(request_topic="t", bulk_topic="b")) == "bulk"


def _room(interactive: int, bulk: int) -> FetchRoom:
    return FetchRoom(interactive=interactive, bulk=bulk)
