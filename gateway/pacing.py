"""Interactive requests first on a gateway's event loop.

A gateway answers interactive requests and runs the batch runner's work (validating,
enqueueing and finalizing batches) on one asyncio event loop, which has no task
priorities: a turn of batch work (a slice of lines parsed, recorded or produced)
holds up every interactive request due to run next, at each of its steps (reading
the body, Redis, the broker's ack, the result). The runner hands the loop back after
each slice; with this pacer, while any interactive request is in flight here, it
also rests after each slice so that its turns take at most `share` of the loop's
time. With no interactive request in flight it runs at full speed, and under a
steady interactive load it still moves, at `share` of the loop (the starvation
guard).
"""

from __future__ import annotations

from asyncio import sleep
from collections.abc import Iterator
from contextlib import contextmanager
from time import perf_counter

# A turn (a slice of lines) takes a few ms; a longer time since the last one is the
# runner idle or waiting on I/O, not working (see turn()).
MAX_TURN_SECONDS = 0.01


class InteractivePacer:
    def __init__(self, share: float) -> None:
        if not 0 < share <= 1:
            raise ValueError(f"share must be in (0, 1], not {share}")
        self.share = share
        self.in_flight = 0  # interactive requests being answered by this gateway
        self._turn_started = perf_counter()

    @contextmanager
    def interactive(self) -> Iterator[None]:
        """Around the answer to one interactive request."""
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1

    async def turn(self) -> None:
        """Between two turns of background work: the loop runs whatever else is ready,
        and while interactive requests are in flight the work rests long enough to keep
        its share. A turn is timed on the wall clock since the end of the last rest (so
        I/O waits inside it count as work: when in doubt, it rests longer), at most
        MAX_TURN_SECONDS."""
        worked = min(perf_counter() - self._turn_started, MAX_TURN_SECONDS)
        if self.in_flight and self.share < 1:
            await sleep(worked * (1 - self.share) / self.share)
        else:
            await sleep(0)
        self._turn_started = perf_counter()
