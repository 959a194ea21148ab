"""Watching a request's text as it is generated: `GET /v1/requests/{id}/stream`
(Server-Sent Events), resumed with Last-Event-ID, served by any gateway
replica, and `GET /v1/requests/{id}` showing the text so far. Real broker,
Redis, gateway and worker (the echo engine, with a delay per token so that a
request runs long enough to be watched)."""

from __future__ import annotations

import asyncio

from tests.conftest import serve_gateway
from tests.integration.helpers import sse_events, submit, wait_final, wait_until

WORDS = " ".join(f"w{i}" for i in range(40))


async def _stream(http, base, request_id, headers=None, stop_after=None):
    """(events, status) of one SSE connection; `stop_after` deltas, then hang up."""
    events = []
    async with http.get(f"{base}/v1/requests/{request_id}/stream", headers=headers or {}) as resp:
        if resp.status != 200:
            return [await resp.json()], resp.status
        assert resp.headers["Content-Type"] == "text/event-stream"
        async for event in sse_events(resp):
            events.append(event)
            if stop_after is not None and sum(e.get("event") == "delta" for e in events) == stop_after:
                break
    return events, 200


def _text(events) -> str:
    text = ""
    for event in events:
        if event.get("event") == "reset":
            text = event["data"]["text"]
        elif event.get("event") == "delta":
            text += event["data"]["text"]
    return text


async def test_streamed_text_is_the_final_text_and_arrives_while_it_runs(gateway, http, start_worker):
    await start_worker(echo_token_delay_ms=30)
    request_id = await submit(http, gateway.url, {"input": {"prompt": WORDS}})
    events = []
    status_at_first_delta = None
    async with http.get(f"{gateway.url}/v1/requests/{request_id}/stream") as resp:
        async for event in sse_events(resp):
            events.append(event)
            if event["event"] == "delta" and status_at_first_delta is None:
                async with http.get(f"{gateway.url}/v1/requests/{request_id}") as record:
                    status_at_first_delta = (await record.json())["status"]
    assert status_at_first_delta == "running"  # tokens reach the client before the request ends
    assert [e["event"] for e in events[-1:]] == ["done"]
    assert sum(e["event"] == "delta" for e in events) > 5
    done = events[-1]["data"]
    assert done["status"] == "succeeded" and done["output"]["text"] == WORDS
    assert _text(events) == WORDS
    assert all(e.get("id") for e in events)


async def test_a_running_request_shows_its_text_so_far(gateway, http, start_worker):
    await start_worker(echo_token_delay_ms=40)
    request_id = await submit(http, gateway.url, {"input": {"prompt": WORDS}})
    seen = {}

    async def partial() -> bool:
        async with http.get(f"{gateway.url}/v1/requests/{request_id}") as resp:
            view = await resp.json()
        if view["status"] == "running" and view["output"] and len(view["output"]["text"]) > 10:
            seen.update(view)
            return True
        return False

    await wait_until(partial, timeout=20, what="a running record with text")
    assert WORDS.startswith(seen["output"]["text"]) and seen["output"]["finish_reason"] is None
    assert (await wait_final(http, gateway.url, request_id))["output"]["text"] == WORDS


async def test_a_client_that_reconnects_with_last_event_id_gets_the_rest(gateway, http, start_worker):
    await start_worker(echo_token_delay_ms=30)
    request_id = await submit(http, gateway.url, {"input": {"prompt": WORDS}})
    first, _ = await _stream(http, gateway.url, request_id, stop_after=3)
    await asyncio.sleep(0.3)  # more is generated while it is away
    rest, _ = await _stream(http, gateway.url, request_id, headers={"Last-Event-ID": first[-1]["id"]})
    assert _text(first) + _text(rest) == WORDS
    assert rest[-1]["event"] == "done"
    # resuming from the last event of a finished stream: just the final record
    again, _ = await _stream(http, gateway.url, request_id, headers={"Last-Event-ID": rest[-1]["id"]})
    assert [e["event"] for e in again] == ["done"]


async def test_a_stream_is_served_by_another_gateway_replica(settings, gateway, http, start_worker):
    await start_worker(echo_token_delay_ms=30)
    request_id = await submit(http, gateway.url, {"input": {"prompt": WORDS}})
    first, _ = await _stream(http, gateway.url, request_id, stop_after=2)
    async with serve_gateway(settings) as replica:
        rest, _ = await _stream(http, replica.url, request_id, headers={"Last-Event-ID": first[-1]["id"]})
    assert _text(first) + _text(rest) == WORDS and rest[-1]["data"]["status"] == "succeeded"


async def test_a_reader_behind_the_cap_still_gets_every_word(broker, redis_server, http, start_worker):
    from tests.conftest import isolated_settings

    capped = isolated_settings(broker, redis_server, stream_max_entries=16)
    async with serve_gateway(capped) as gateway:
        worker_settings = {"stream_max_entries": 16, "echo_token_delay_ms": 5}
        from workers.worker import Worker

        worker = Worker(capped.model_copy(update=worker_settings))
        task = asyncio.create_task(worker.run())
        try:
            words = " ".join(f"w{i}" for i in range(300))
            request_id = await submit(http, gateway.url, {"input": {"prompt": words}, "params": {"max_tokens": 300}})
            async with http.get(f"{gateway.url}/v1/requests/{request_id}/stream") as resp:
                events = sse_events(resp)
                first = await anext(events)
                await wait_final(http, gateway.url, request_id)  # the reader falls far behind the cap
                assert await redis_len(capped, request_id) <= 16
                rest = [event async for event in events]
            assert _text([first, *rest]) == words and rest[-1]["event"] == "done"
            whole, _ = await _stream(http, gateway.url, request_id)  # and from the start, after the trim
            assert _text(whole) == words
        finally:
            worker.stop()
            await task


async def redis_len(settings, request_id) -> int:
    from shared.keys import Keys
    from shared.store import connect_redis

    redis = connect_redis(settings.redis_url)
    try:
        return await redis.xlen(Keys.of(settings).stream(request_id))
    finally:
        await redis.aclose()


async def test_cancelling_a_streamed_request_ends_its_stream(gateway, http, start_worker):
    await start_worker(echo_token_delay_ms=50)
    request_id = await submit(http, gateway.url, {"input": {"prompt": WORDS}})
    events = []
    async with http.get(f"{gateway.url}/v1/requests/{request_id}/stream") as resp:
        async for event in sse_events(resp):
            events.append(event)
            if len(events) == 3:
                async with http.delete(f"{gateway.url}/v1/requests/{request_id}") as cancelled:
                    assert cancelled.status == 200
    assert events[-1]["event"] == "done" and events[-1]["data"]["status"] == "cancelled"
    assert WORDS.startswith(_text(events)) and _text(events) != WORDS


async def test_streams_of_finished_unknown_and_bad_resumes(gateway, http, start_worker):
    await start_worker()
    request_id = await submit(http, gateway.url, {"input": {"prompt": "already done"}})
    await wait_final(http, gateway.url, request_id)
    events, _ = await _stream(http, gateway.url, request_id)
    assert [e["event"] for e in events] == ["delta", "done"] and _text(events) == "already done"

    body, status = await _stream(http, gateway.url, "no-such-request")
    assert status == 404 and body[0]["error"]["type"] == "not_found"
    for bad in ("garbage", "99999999999999-0"):
        body, status = await _stream(http, gateway.url, request_id, headers={"Last-Event-ID": bad})
        assert status == 400 and body[0]["error"]["type"] == "invalid_last_event_id"


async def test_the_torch_engine_streams_exactly_its_final_text(gateway, http, start_worker, tiny_model_dir):
    await start_worker(engine="torch", model=str(tiny_model_dir))
    body = {"input": {"prompt": "The queue hands every request to"}, "params": {"max_tokens": 48, "temperature": 0}}
    request_id = await submit(http, gateway.url, body)
    events, _ = await _stream(http, gateway.url, request_id)
    done = events[-1]["data"]
    assert done["status"] == "succeeded" and done["usage"]["completion_tokens"] == 48
    assert sum(e["event"] == "delta" for e in events) > 1 and _text(events) == done["output"]["text"]


async def test_a_redis_restart_mid_stream_ends_it_clearly_and_the_client_resumes(broker, tmp_path, http):
    from deploy.devstack import free_port, start_redis
    from tests.conftest import isolated_settings
    from workers.worker import Worker

    port, redis_dir = free_port(), tmp_path / "redis"
    redis = start_redis(port, redis_dir, persistent=True)  # restarted below with what it held
    own = isolated_settings(broker, redis)
    worker = Worker(own.model_copy(update={"echo_token_delay_ms": 40}))
    task = asyncio.create_task(worker.run())
    try:
        async with serve_gateway(own) as gateway:
            words = " ".join(f"w{i}" for i in range(80))
            request_id = await submit(http, gateway.url, {"input": {"prompt": words}, "params": {"max_tokens": 80}})
            events = []
            async with asyncio.timeout(20):  # nothing hangs
                async with http.get(f"{gateway.url}/v1/requests/{request_id}/stream") as resp:
                    async for event in sse_events(resp):
                        events.append(event)
                        if len(events) == 3:
                            redis.stop()
            assert events[-1]["event"] == "error" and events[-1]["data"]["error"]["type"] == "stream_lost"

            redis = start_redis(port, redis_dir, persistent=True)
            last_id = [e for e in events if e.get("id")][-1]["id"]
            rest, status = await _stream(http, gateway.url, request_id, headers={"Last-Event-ID": last_id})
            assert status == 200 and rest[-1]["event"] == "done" and rest[-1]["data"]["status"] == "succeeded"
            assert _text(events[:-1] + rest) == words
    finally:
        worker.stop()
        await asyncio.wait_for(task, 30)
        redis.stop()


async def test_a_stream_interval_sends_fewer_larger_pieces(gateway, http, start_worker):
    # 40 words at 20 ms each take 0.8 s: with a write at most every 250 ms, a handful of pieces
    await start_worker(echo_token_delay_ms=20, stream_interval_ms=250)
    request_id = await submit(http, gateway.url, {"input": {"prompt": WORDS}})
    events, _ = await _stream(http, gateway.url, request_id)
    deltas = [e for e in events if e["event"] == "delta"]
    assert 2 <= len(deltas) <= 8, [d["data"]["text"] for d in deltas]
    assert _text(events) == WORDS == events[-1]["data"]["output"]["text"]
