"""Small client-side helpers the integration tests share."""

from __future__ import annotations

import asyncio
import time

from aiohttp import ClientSession


async def submit(http: ClientSession, base: str, body: dict) -> str:
    async with http.post(f"{base}/v1/requests", json=body) as resp:
        assert resp.status == 202, await resp.text()
        return (await resp.json())["id"]


async def wait_final(http: ClientSession, base: str, request_id: str, timeout: float = 30,
                     not_yet_recorded: bool = False) -> dict:
    """Long-poll until the request is final. `not_yet_recorded`: a request produced
    straight to Kafka is unknown (404) until a worker records it."""
    deadline = time.monotonic() + timeout
    view = None
    while time.monotonic() < deadline:
        async with http.get(f"{base}/v1/requests/{request_id}", params={"wait": "5"}) as resp:
            if resp.status == 404 and not_yet_recorded:
                await asyncio.sleep(0.05)
                continue
            assert resp.status == 200, await resp.text()
            view = await resp.json()
        if view["status"] not in ("queued", "running"):
            return view
    raise AssertionError(f"{request_id} not finished within {timeout} s: {view}")


async def wait_until(predicate, timeout: float = 30, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")
