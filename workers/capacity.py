"""How many fetched requests a worker holds (running, or waiting for a slot in
the engine) against its limit, LLMQ_MAX_IN_FLIGHT. The fetch loop takes
places and waits for room; whoever is done with a request gives its place back."""

from __future__ import annotations

import asyncio


class Capacity:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self._room = asyncio.Event()

    @property
    def free(self) -> int:
        return self.limit - self.held

    def take(self, count: int) -> None:
        self.held += count

    def give_back(self) -> None:
        self.held -= 1
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
