"""`POST /v1/requests` made safe to retry and to wait on: an `Idempotency-Key`
answers a retry with the request it first admitted (nothing enqueued twice), a
client may choose the request's `id` (never overwriting another request), and
`Prefer: wait=N` answers with the finished record when it is done in time."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from deploy.devstack import free_port, start_broker
from tests.conftest import serve_gateway
from tests.integration.helpers import api_keys, submit, wait_final, wait_until

BODY = {"input": {"prompt": "only once please"}, "params": {"max_tokens": 8}}


async def post(http, base: str, body: dict | str, **headers: str):
    """(status, JSON body, headers) of one submit; a str body is sent as it is."""
    data = body if isinstance(body, str) else json.dumps(body)
    headers = {"Content-Type": "application/json", **{k.replace("_", "-"): v for k, v in headers.items()}}
    async with http.post(f"{base}/v1/requests", data=data, headers=headers) as resp:
        return resp.status, await resp.json(), resp.headers


async def messages_on_topic(settings) -> int:
    """How many messages the request topic holds, read by a probe that joins no group."""
    probe = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False)
    await probe.start()
    try:
        partitions = [TopicPartition(settings.request_topic, p) for p in range(settings.request_partitions)]
        start, end = await probe.beginning_offsets(partitions), await probe.end_offsets(partitions)
        return sum(end[p] - start[p] for p in partitions)
    finally:
        await probe.stop()


async def record_count(gateway) -> int:
    return len([k async for k in gateway.redis.scan_iter(match=gateway.store.keys.request("*"))])


# ---- Idempotency-Key ------------------------------------------------------------------


async def test_a_retry_with_the_same_key_answers_with_the_same_request(settings, gateway, http, start_worker):
    status, first, headers = await post(http, gateway.url, BODY, Idempotency_Key="order-42")
    assert status == 202 and "Idempotent-Replayed" not in headers
    # The same body written differently (key order, spacing) is the same request.
    reordered = '{"params": {"max_tokens": 8.0},   "input": {"prompt": "only once please"}}'
    status, again, headers = await post(http, gateway.url, reordered, Idempotency_Key="order-42")
    assert status == 202
    assert again == first == {"id": first["id"], "status": "queued", "status_url": f"/v1/requests/{first['id']}"}
    assert headers["Idempotent-Replayed"] == "true"
    assert headers["Location"] == first["status_url"]
    assert await record_count(gateway) == 1
    assert await messages_on_topic(settings) == 1

    await start_worker()
    view = await wait_final(http, gateway.url, first["id"])
    assert view["status"] == "succeeded" and view["attempts"] == 1
    # A replay after it finished says so.
    status, later, headers = await post(http, gateway.url, BODY, Idempotency_Key="order-42")
    assert (status, later["id"], later["status"]) == (202, first["id"], "succeeded")
    assert headers["Idempotent-Replayed"] == "true"
    assert await messages_on_topic(settings) == 1


async def test_the_same_key_with_another_body_is_refused(settings, gateway, http):
    status, first, _ = await post(http, gateway.url, BODY, Idempotency_Key="k1")
    assert status == 202
    other = {**BODY, "params": {"max_tokens": 9}}
    status, refused, _ = await post(http, gateway.url, other, Idempotency_Key="k1")
    assert status == 422
    assert refused["error"]["type"] == "idempotency_key_reused"
    assert refused["error"]["field"] == "Idempotency-Key"
    # Another key is another request; no key, too.
    status, second, _ = await post(http, gateway.url, other, Idempotency_Key="k2")
    assert status == 202 and second["id"] != first["id"]
    assert await messages_on_topic(settings) == 2


async def test_a_key_must_be_1_to_255_characters(gateway, http):
    for key in ("", "x" * 256):
        status, body, _ = await post(http, gateway.url, BODY, Idempotency_Key=key)
        assert status == 422
        assert body["error"]["type"] == "invalid_request" and body["error"]["field"] == "Idempotency-Key"
    status, _, _ = await post(http, gateway.url, BODY, Idempotency_Key="x" * 255)
    assert status == 202
    assert await record_count(gateway) == 1


async def test_a_key_whose_request_expired_admits_a_new_one(settings, http):
    """A window longer than the records' TTL: once the record is gone, the key names nothing."""
    short_lived = settings.model_copy(update={"result_ttl_seconds": 1})
    async with serve_gateway(short_lived) as gateway:
        status, first, _ = await post(http, gateway.url, BODY, Idempotency_Key="renewed")
        assert status == 202

        async def gone():
            async with http.get(f"{gateway.url}/v1/requests/{first['id']}") as resp:
                return resp.status == 404

        await wait_until(gone, timeout=15, what="the record to expire")
        status, second, headers = await post(http, gateway.url, BODY, Idempotency_Key="renewed")
        assert status == 202 and second["id"] != first["id"]
        assert "Idempotent-Replayed" not in headers


@pytest.fixture
def auth_settings(settings):
    return settings.model_copy(update={"auth": True})


@pytest.fixture
def alice_and_bob(auth_settings):
    return api_keys(auth_settings, "alice", "bob")


async def test_each_api_key_has_keys_of_its_own(secured, http, alice_and_bob, auth_settings):
    ids = []
    for name in ("alice", "bob"):
        bearer = f"Bearer {alice_and_bob[name]}"
        status, accepted, headers = await post(http, secured.url, BODY, Idempotency_Key="same", Authorization=bearer)
        assert status == 202 and "Idempotent-Replayed" not in headers
        ids.append(accepted["id"])
    assert ids[0] != ids[1]
    assert await messages_on_topic(auth_settings) == 2


@pytest.fixture
async def own_broker(tmp_path):
    """A broker of this test's own, so it can be paused (SIGSTOP), never restarted."""
    service = start_broker(free_port(), tmp_path / "broker.log")
    yield service
    service.resume()  # a failed test may leave it stopped
    service.kill()


async def test_a_key_refused_with_503_is_free_for_the_retry(settings, http, own_broker):
    settings = settings.model_copy(update={"kafka_bootstrap": own_broker.url, "produce_timeout_seconds": 1.0})
    async with serve_gateway(settings) as gateway:
        await submit(http, gateway.url, BODY)  # the producer is connected before the broker stops answering
        own_broker.pause()
        try:
            status, refused, _ = await post(http, gateway.url, BODY, Idempotency_Key="retry-me")
        finally:
            own_broker.resume()
        assert status == 503 and refused["error"]["type"] == "broker_unavailable"

        status, accepted, headers = await post(http, gateway.url, BODY, Idempotency_Key="retry-me")
        assert status == 202 and "Idempotent-Replayed" not in headers
        status, replayed, headers = await post(http, gateway.url, BODY, Idempotency_Key="retry-me")
        assert (status, replayed["id"], headers["Idempotent-Replayed"]) == (202, accepted["id"], "true")


async def test_concurrent_retries_with_one_key_make_one_request(settings, gateway, http):
    answers = await asyncio.gather(*(post(http, gateway.url, BODY, Idempotency_Key="burst") for _ in range(10)))
    assert [status for status, _, _ in answers] == [202] * 10
    assert len({body["id"] for _, body, _ in answers}) == 1
    assert sum(headers.get("Idempotent-Replayed") == "true" for _, _, headers in answers) == 9
    assert await messages_on_topic(settings) == 1


# ---- a client-chosen id -------------------------------------------------------------------


async def test_a_chosen_id_is_used_once(settings, gateway, http, start_worker):
    first = {"id": "invoice:2024-001", "input": {"prompt": "the first one"}, "metadata": {"n": "1"}}
    status, accepted, headers = await post(http, gateway.url, first)
    assert status == 202 and accepted["id"] == "invoice:2024-001"
    assert headers["Location"] == "/v1/requests/invoice:2024-001"

    second = {"id": "invoice:2024-001", "input": {"prompt": "the second one"}, "metadata": {"n": "2"}}
    status, refused, _ = await post(http, gateway.url, second)
    assert status == 409
    assert refused == {"error": {"type": "id_in_use", "field": "id",
                                 "message": "a request with this id already exists; choose another id"}}
    status, bad, _ = await post(http, gateway.url, {**second, "id": "no/slashes"})
    assert status == 422 and bad["error"]["field"] == "id"

    await start_worker()
    view = await wait_final(http, gateway.url, "invoice:2024-001")
    assert view["status"] == "succeeded" and view["attempts"] == 1
    assert view["output"]["text"] == "the first one" and view["metadata"] == {"n": "1"}
    assert await messages_on_topic(settings) == 1
    # Finished, it is still in use.
    assert (await post(http, gateway.url, second))[0] == 409


async def test_another_api_key_cannot_take_or_read_a_chosen_id(secured, http, alice_and_bob):
    alice, bob = ({"Authorization": f"Bearer {alice_and_bob[name]}"} for name in ("alice", "bob"))
    mine = {"id": "alice-1", "input": {"prompt": "alice's"}}
    status, _, _ = await post(http, secured.url, mine, **alice)
    assert status == 202
    status, alice_again, _ = await post(http, secured.url, mine, **alice)
    status_bob, bob_refused, _ = await post(http, secured.url, {**mine, "input": {"prompt": "bob's"}}, **bob)
    assert status == status_bob == 409
    assert bob_refused == alice_again  # the same answer whoever owns it
    async with http.get(f"{secured.url}/v1/requests/alice-1", headers=bob) as resp:
        assert resp.status == 404
    async with http.get(f"{secured.url}/v1/requests/alice-1", headers=alice) as resp:
        view = await resp.json()
        assert resp.status == 200 and view["status"] == "queued"


# ---- Prefer: wait=N -------------------------------------------------------------------------


async def test_prefer_wait_answers_with_the_finished_record(gateway, http, start_worker):
    await start_worker()
    status, view, headers = await post(http, gateway.url, {"input": {"prompt": "done while you wait"}},
                                       Prefer="wait=5")
    assert status == 200
    assert view["status"] == "succeeded"
    assert view["output"] == {"text": "done while you wait", "finish_reason": "stop"}
    assert headers["Preference-Applied"] == "wait=5"
    assert headers["Location"] == f"/v1/requests/{view['id']}"
    async with http.get(f"{gateway.url}{headers['Location']}") as resp:
        assert await resp.json() == view


async def test_prefer_wait_runs_out_into_a_202(gateway, http):
    started = time.monotonic()
    status, accepted, headers = await post(http, gateway.url, BODY, Prefer="respond-async, wait=1")
    assert time.monotonic() - started >= 0.9  # it did wait: no worker runs it
    assert status == 202 and accepted["status"] == "queued"
    assert headers["Location"] == accepted["status_url"]
    assert headers["Preference-Applied"] == "wait=1"


async def test_prefer_wait_is_capped_and_unreadable_preferences_are_ignored(settings, http):
    capped = settings.model_copy(update={"max_wait_seconds": 0.5})
    async with serve_gateway(capped) as gateway:
        status, _, headers = await post(http, gateway.url, BODY, Prefer="wait=30")
        assert status == 202 and headers["Preference-Applied"] == "wait=0.5"
        for prefer in ("wait=soon", "wait=-1", "wait", "wait=0", "handling=lenient"):
            status, _, headers = await post(http, gateway.url, BODY, Prefer=prefer)
            assert status == 202 and "Preference-Applied" not in headers, prefer


async def test_a_replay_with_prefer_wait_waits_on_the_first_request(settings, gateway, http, start_worker):
    status, first, _ = await post(http, gateway.url, BODY, Idempotency_Key="wait-on-me")
    assert status == 202
    await start_worker()
    status, view, headers = await post(http, gateway.url, BODY, Idempotency_Key="wait-on-me", Prefer="wait=10")
    assert status == 200
    assert (view["id"], view["status"], view["output"]["text"]) == (first["id"], "succeeded", "only once please")
    assert headers["Idempotent-Replayed"] == "true" and headers["Preference-Applied"] == "wait=10"
    assert await messages_on_topic(settings) == 1
