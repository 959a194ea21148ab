"""How many fetched requests a worker holds (running, or waiting for a slot in
the engine) against its limit, LLMQ_MAX_IN_FLIGHT, and how many of them each
lane holds (bulk's share is bounded: workers/lanes.py). The fetch loop takes
places and waits for room; whoever is done with a request gives its place back."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from shared.schema import Lane


class Capacity:
    def __init__(self, limit: int, on_change: Callable[[Lane, int], None] | None = None) -> None:
        self.limit = limit
        self.held = 0
        self.held_by: dict[Lane, int] = {"interactive": 0, "bulk": 0}
        self._on_change = on_change or (lambda lane, held: None)  # e.g. a per-lane gauge
        self._room = asyncio.Event()
        self.given_back = asyncio.Event()  # set by every give_back; the fetch loop clears it each turn

    @property
    def free(self) -> int:
        return self.limit - self.held

    def take(self, count: int, lane: Lane = "interactive") -> None:
        self.held += count
        self.held_by[lane] += count
        self._on_change(lane, self.held_by[lane])

    def give_back(self, lane: Lane = "interactive") -> None:
        self.held -= 1
        self.held_by[lane] -= 1
        self._on_change(lane, self.held_by[lane])
        self.given_back.set()
        if self.held < self.limit:
            self._room.set()

    async def wait_for_room(self, timeout: float) -> bool:
        """True once a place is free; False if none was within `timeout` seconds."""
        self._room.clear()
        if self.free > 0:
            return True
        try:
            async with asyncio.timeout(timeout):
                await self._room.wait()
            return True
        except TimeoutError:
            return False
