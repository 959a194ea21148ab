"""Where workers run. A backend answers how many workers there are and sets that number.

    current() -> int      workers running and not asked to stop
    scale(n)              start or stop workers until there are n
    close()               the scaler is leaving (local: stop its workers)
"""

from __future__ import annotations

from typing import Protocol


class Backend(Protocol):
    name: str

    async def start(self) -> None: ...

    async def current(self) -> int: ...

    async def scale(self, desired: int) -> None: ...

    async def close(self) -> None: ...

    def describe(self) -> dict: ...
