"""A dead broker or Redis: the gateway answers 503 with a JSON error, accepts
nothing it cannot record and enqueue, and leaves nothing half-written."""

from __future__ import annotations

import pytest

from deploy.devstack import free_port, start_broker, start_redis
from tests.conftest import serve_gateway


@pytest.fixture
async def own_services(settings, tmp_path):
    """A broker and a Redis of this test's own, so it can kill them."""
    broker = start_broker(free_port(), tmp_path / "broker.log")
    redis = start_redis(free_port(), tmp_path / "redis")
    yield settings.model_copy(update={"kafka_bootstrap": broker.url, "redis_url": redis.url,
                                      "produce_timeout_seconds": 1.0}), broker, redis
    broker.kill()
    redis.stop()


@pytest.fixture
async def own_gateway(own_services):
    settings, broker, redis = own_services
    async with serve_gateway(settings) as gateway:
        yield gateway, broker, redis


async def _submit(http, gateway):
    async with http.post(f"{gateway.url}/v1/requests", json={"input": {"prompt": "hi"}}) as resp:
        return resp.status, await resp.json(), resp.headers


async def test_ready_when_both_are_up(own_gateway, http):
    gateway, _, _ = own_gateway
    async with http.get(f"{gateway.url}/readyz") as resp:
        assert resp.status == 200
        assert (await resp.json()) == {"status": "ready", "checks": {"redis": "ok", "kafka": "ok"}}
    async with http.get(f"{gateway.url}/healthz") as resp:
        assert resp.status == 200


async def test_broker_down_gives_503_and_no_record(own_gateway, http):
    gateway, broker, _ = own_gateway
    assert (await _submit(http, gateway))[0] == 202
    broker.kill()

    status, body, headers = await _submit(http, gateway)

    assert status == 503
    assert body["error"]["type"] == "broker_unavailable"
    assert headers["Retry-After"] == "1"
    keys = [k async for k in gateway.redis.scan_iter(match=f"{gateway.settings.redis_prefix}:req:*")]
    # The one accepted before the broker died, and the refused one cancelled: its
    # produce might still land later (tests/integration/test_faults.py), and a final
    # record makes workers skip it.
    assert sorted([await gateway.redis.hget(k, "status") for k in keys]) == ["cancelled", "queued"]
    async with http.get(f"{gateway.url}/readyz") as resp:
        assert resp.status == 503
        assert (await resp.json())["checks"]["kafka"].startswith("unreachable")


async def test_redis_down_gives_503_on_submit_and_poll(own_gateway, http):
    gateway, _, redis = own_gateway
    status, accepted, _ = await _submit(http, gateway)
    assert status == 202
    redis.stop()

    status, body, _ = await _submit(http, gateway)
    assert status == 503
    assert body["error"]["type"] == "redis_unavailable"
    for params in ({}, {"wait": "1"}):
        async with http.get(f"{gateway.url}/v1/requests/{accepted['id']}", params=params) as resp:
            assert resp.status == 503
            assert (await resp.json())["error"]["type"] == "redis_unavailable"
    async with http.get(f"{gateway.url}/readyz") as resp:
        assert resp.status == 503
        assert (await resp.json())["checks"]["redis"].startswith("unreachable")
