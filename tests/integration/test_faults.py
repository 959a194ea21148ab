"""Faults under load, on real processes: a worker told to stop, Redis restarted,
the broker paused, records outliving their TTL, and an engine failing one
request of a batch. Each test asserts what a user would see (final statuses,
attempts, counts); none asserts a timing.

Workers run as `python -m workers.main` subprocesses (the process contract a
deployment relies on: LLMQ_* settings in, signals, exit codes). A test that
stops or pauses Redis or the broker starts its own; the session's are shared.
"""

from __future__ import annotations

import asyncio
import signal

import pytest

from deploy.devstack import Service, free_port, start_broker, start_redis
from tests.conftest import serve_gateway
from tests.integration.helpers import committed_offsets, submit, wait_final, wait_until


async def records(gateway, ids: list[str]) -> list[dict]:
    """The raw Redis records of `ids` (status, attempts), one pipelined round trip."""
    async with gateway.redis.pipeline(transaction=False) as pipe:
        for request_id in ids:
            pipe.hmget(gateway.store.keys.request(request_id), "status", "attempts")
        rows = await pipe.execute()
    return [{"status": status, "attempts": int(attempts or 0)} for status, attempts in rows]


async def statuses(gateway, ids: list[str]) -> list[str]:
    return [r["status"] for r in await records(gateway, ids)]


async def submit_many(http, base: str, count: int, prompt: str = "one two three four", **params) -> list[str]:
    body = {"input": {"prompt": prompt}, "params": {"max_tokens": 16, **params}}
    return list(await asyncio.gather(*(submit(http, base, body) for _ in range(count))))


async def post(http, base: str) -> tuple[int, dict]:
    async with http.post(f"{base}/v1/requests", json={"input": {"prompt": "during the fault"}}) as resp:
        return resp.status, await resp.json()


async def all_final(http, base: str, ids: list[str], timeout: float = 60) -> list[dict]:
    return list(await asyncio.gather(*(wait_final(http, base, i, timeout=timeout) for i in ids)))


async def stored_ids(gateway) -> set[str]:
    prefix = gateway.store.keys.request("")
    return {key[len(prefix):] async for key in gateway.redis.scan_iter(match=f"{prefix}*", count=1000)}


# ---- 1. a worker told to stop drains ----------------------------------------------


async def test_sigterm_drains_under_load_and_nothing_runs_twice(settings, gateway, http, spawn_worker):
    # 100 ms per token and 4 tokens: each batch of 8 is in flight for ~0.4 s, and
    # 120 requests are ~15 batches, so the signal lands with work in hand and more queued.
    slow = settings.model_copy(update={"echo_token_delay_ms": 100, "batch_max_size": 8})
    ids = await submit_many(http, gateway.url, 120)
    first = spawn_worker(slow, "first")

    async def some_succeeded():
        return "succeeded" in await statuses(gateway, ids)

    await wait_until(some_succeeded, timeout=60, what="the first worker to finish a batch")
    first.signal(signal.SIGTERM)
    assert await first.exit_code(timeout=30) == 0, first.log()

    # It finished what it held and took nothing more: no record is left running,
    # and the rest is still queued for whoever comes next.
    left = await statuses(gateway, ids)
    assert set(left) <= {"succeeded", "queued"}, left
    assert "queued" in left, "the worker drained the whole topic instead of stopping"
    # ... and committed exactly what it finished, so the group's lag (what the scaler
    # reads) counts the rest, and the next worker starts where it stopped.
    assert sum(offset or 0 for offset in await committed_offsets(settings)) == left.count("succeeded")

    spawn_worker(slow, "second")
    views = await all_final(http, gateway.url, ids)
    assert [v["status"] for v in views] == ["succeeded"] * len(ids)
    # A clean drain hands nothing back half-done, so nothing ran twice.
    assert [v["attempts"] for v in views] == [1] * len(ids)


# ---- 2. Redis stopped and started again --------------------------------------------


@pytest.fixture
async def own_redis(tmp_path):
    """A Redis of this test's own, persistent (append-only file), so it can be restarted with its records."""
    service = start_redis(free_port(), tmp_path / "redis", persistent=True)
    holder = {"service": service}
    yield holder
    holder["service"].stop()


async def test_redis_restart_under_load_loses_nothing(settings, http, spawn_worker, own_redis, tmp_path):
    redis: Service = own_redis["service"]
    settings = settings.model_copy(update={"redis_url": redis.url, "echo_token_delay_ms": 100, "batch_max_size": 8})
    async with serve_gateway(settings) as gateway:
        spawn_worker(settings)
        probe = await submit(http, gateway.url, {"input": {"prompt": "warm up"}})
        assert (await wait_final(http, gateway.url, probe, timeout=60))["status"] == "succeeded"

        before = await submit_many(http, gateway.url, 40)

        async def some_running():
            return "running" in await statuses(gateway, before)

        await wait_until(some_running, timeout=30, what="a batch in flight")
        redis.stop()  # SIGTERM: Redis flushes its append-only file and exits

        # While it's down: a clear 503 for submits and polls, nothing accepted.
        refused = await asyncio.gather(*(post(http, gateway.url) for _ in range(5)))
        assert [status for status, _ in refused] == [503] * 5
        assert {body["error"]["type"] for _, body in refused} == {"redis_unavailable"}
        async with http.get(f"{gateway.url}/v1/requests/{before[0]}") as resp:
            assert resp.status == 503 and (await resp.json())["error"]["type"] == "redis_unavailable"
        # Long enough for the batch in flight to finish and meet a dead Redis with its
        # results: the worker must keep them and retry, not drop them.
        await asyncio.sleep(2)

        own_redis["service"] = redis = start_redis(redis.port, tmp_path / "redis", persistent=True)
        after = await submit_many(http, gateway.url, 20)

        views = await all_final(http, gateway.url, [probe, *before, *after])
        assert [v["status"] for v in views] == ["succeeded"] * len(views)
        assert await stored_ids(gateway) == {probe, *before, *after}


# ---- 3. the broker paused ------------------------------------------------------------


@pytest.fixture
def own_broker(tmp_path):
    """A broker of this test's own, so it can be paused. Memory-only: it is paused
    (SIGSTOP/SIGCONT), never restarted, which would lose its topics and messages."""
    service = start_broker(free_port(), tmp_path / "broker.log")
    yield service
    service.resume()  # a failed test may leave it stopped
    service.kill()


async def test_broker_paused_gives_503_then_everything_succeeds(settings, http, spawn_worker, own_broker):
    settings = settings.model_copy(update={"kafka_bootstrap": own_broker.url, "produce_timeout_seconds": 1.0,
                                           "echo_token_delay_ms": 100, "batch_max_size": 8})
    async with serve_gateway(settings) as gateway:
        spawn_worker(settings)
        probe = await submit(http, gateway.url, {"input": {"prompt": "warm up"}})
        assert (await wait_final(http, gateway.url, probe, timeout=60))["status"] == "succeeded"

        before = await submit_many(http, gateway.url, 40)
        own_broker.pause()
        try:
            refused = await asyncio.gather(*(post(http, gateway.url) for _ in range(5)))
            # Paused past the group's session timeout, so that the worker's fetches,
            # commits and heartbeats all go unanswered, and it must rejoin afterwards.
            await asyncio.sleep(settings.session_timeout_ms / 1000)
        finally:
            own_broker.resume()
        assert [status for status, _ in refused] == [503] * 5
        assert {body["error"]["type"] for _, body in refused} == {"broker_unavailable"}

        after = await submit_many(http, gateway.url, 20)
        views = await all_final(http, gateway.url, [probe, *before, *after])
        assert [v["status"] for v in views] == ["succeeded"] * len(views)
        # A request answered 503 was not accepted: it must never run, not even once
        # the resumed broker takes the produce it had been sent (by now it has, and a
        # worker has fetched it; before the gateway's fix it ran and left a record).
        accepted = {probe, *before, *after}
        refused_records = await records(gateway, sorted(await stored_ids(gateway) - accepted))
        assert len(refused_records) <= len(refused)
        assert all(r == {"status": "cancelled", "attempts": 0} for r in refused_records), refused_records


# ---- 4. results expire ----------------------------------------------------------------


async def test_result_is_gone_after_its_ttl(settings, http, spawn_worker):
    settings = settings.model_copy(update={"result_ttl_seconds": 2})
    async with serve_gateway(settings) as gateway:
        spawn_worker(settings)
        request_id = await submit(http, gateway.url, {"input": {"prompt": "short lived"}})
        assert (await wait_final(http, gateway.url, request_id, timeout=60))["status"] == "succeeded"

        async def gone():
            async with http.get(f"{gateway.url}/v1/requests/{request_id}") as resp:
                return resp.status == 404 and (await resp.json())["error"]["type"] == "not_found"

        await wait_until(gone, timeout=30, what="the finished record to expire")


# ---- 5. one request fails in the engine, its batch mates don't ---------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from workers import tinymodel

    return tinymodel.build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama")


async def test_prompt_over_the_context_fails_alone_and_the_worker_goes_on(settings, gateway, http, spawn_worker,
                                                                          tiny_model):
    torch_settings = settings.model_copy(update={"engine": "torch", "model": str(tiny_model), "device": "cpu",
                                                 "batch_max_wait_ms": 200})
    # All in the topic before the worker starts, so its first fetch takes them together.
    long_prompt = "word " * 3000  # over 2,048 tokens, the tiny model's context
    body = {"params": {"max_tokens": 8, "temperature": 0}}
    too_long, *fine = await asyncio.gather(
        submit(http, gateway.url, {"input": {"prompt": long_prompt}, **body}),
        *(submit(http, gateway.url, {"input": {"prompt": f"A queue is number {i}"}, **body}) for i in range(3)),
    )
    worker = spawn_worker(torch_settings)

    failed = await wait_final(http, gateway.url, too_long, timeout=120)
    assert failed["status"] == "failed", worker.log()
    assert "context" in failed["error"]["message"], failed["error"]
    assert failed["output"] is None
    for view in await all_final(http, gateway.url, fine, timeout=60):
        assert view["status"] == "succeeded" and view["usage"]["completion_tokens"] == 8, view

    later = await submit(http, gateway.url, {"input": {"prompt": "still serving"}, **body})
    assert (await wait_final(http, gateway.url, later, timeout=60))["status"] == "succeeded"
    assert worker.proc.poll() is None, worker.log()
