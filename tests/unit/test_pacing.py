"""The batch runner's turns on the gateway's event loop (gateway/pacing.py): at full
speed while no interactive request is in flight, resting to keep its share while one is.
The clock and the sleeps are the pacer's own, replaced here so the rests are exact."""

from __future__ import annotations

import pytest

from gateway import pacing
from gateway.app import INTERACTIVE_PATHS
from gateway.batches.routes import PATHS as BULK_PATHS
from gateway.openai_routes import PATHS as OPENAI_PATHS
from gateway.pacing import MAX_TURN_SECONDS, InteractivePacer


@pytest.fixture
def clock(monkeypatch):
    """perf_counter under the test's control; every sleep the pacer asks for, recorded."""
    state = {"now": 100.0, "slept": []}

    async def sleep(seconds):
        state["slept"].append(seconds)
        state["now"] += seconds

    monkeypatch.setattr(pacing, "perf_counter", lambda: state["now"])
    monkeypatch.setattr(pacing, "sleep", sleep)
    return state


async def test_without_interactive_requests_the_work_only_hands_the_loop_back(clock):
    pacer = InteractivePacer(share=0.2)
    clock["now"] += 0.004  # a turn of work
    await pacer.turn()
    assert clock["slept"] == [0]


async def test_with_an_interactive_request_in_flight_the_work_keeps_its_share(clock):
    pacer = InteractivePacer(share=0.2)
    with pacer.interactive():
        clock["now"] += 0.004
        await pacer.turn()
        clock["now"] += 0.002
        await pacer.turn()
    assert clock["slept"] == pytest.approx([0.016, 0.008])  # 4 ms of work, 16 of rest: 20 %
    assert pacer.in_flight == 0
    clock["now"] += 0.004
    await pacer.turn()
    assert clock["slept"][-1] == 0


async def test_time_away_from_the_work_is_not_counted_as_a_turn(clock):
    pacer = InteractivePacer(share=0.5)
    clock["now"] += 30  # idle since start-up, or waiting on the broker
    with pacer.interactive():
        await pacer.turn()
    assert clock["slept"] == [pytest.approx(MAX_TURN_SECONDS)]


async def test_share_one_never_rests(clock):
    pacer = InteractivePacer(share=1)
    with pacer.interactive():
        clock["now"] += 0.004
        await pacer.turn()
    assert clock["slept"] == [0]


def test_interactive_routes_are_the_generation_calls_not_bulk_work():
    assert {"/v1/requests", *OPENAI_PATHS} <= INTERACTIVE_PATHS
    assert not INTERACTIVE_PATHS & set(BULK_PATHS)


@pytest.mark.parametrize("share", [0, -0.1, 1.5])
def test_share_is_a_fraction(share):
    with pytest.raises(ValueError):
        InteractivePacer(share)
