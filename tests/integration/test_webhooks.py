"""Webhooks end to end, of requests and of batches: a real gateway (with its
webhook sender and batch runner), a real echo worker, the real broker and Redis,
and a real HTTP receiver (aiohttp, in the test) that verifies every delivery
with the `standardwebhooks` package.

The receiver listens on 127.0.0.1, so these tests allow private addresses
(LLMQ_WEBHOOK_ALLOW_PRIVATE=true), as local development would; the tests of the
guard itself run with the default (refused).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import openai
import pytest
from aiohttp import web
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from shared.keys import Keys
from shared.schema import RequestMessage
from shared.store import connect_redis
from tests.conftest import isolated_settings, serve_gateway
from tests.integration.helpers import api_keys, llmq_keys, submit, wait_final, wait_until
from tests.integration.test_batches import _chat_lines, _client, _upload, _wait_batch


@dataclass
class Receiver:
    """An HTTP endpoint that answers each POST with the next of `answers` (then 200),
    or always with `always` when set, and keeps what it was sent."""

    url: str = ""
    answers: list[int] = field(default_factory=list)
    always: int | None = None
    posts: list[tuple[dict[str, str], bytes, int]] = field(default_factory=list)  # headers, body, answered

    async def handle(self, request: web.Request) -> web.Response:
        status = self.always or (self.answers.pop(0) if self.answers else 200)
        self.posts.append((dict(request.headers), await request.read(), status))
        return web.Response(status=status)

    def accepted(self, secret: str) -> list[dict]:
        """The payloads it answered 2xx to, each verified against `secret` (raises if one does not verify)."""
        return [Webhook(secret).verify(body, headers) for headers, body, status in self.posts if status < 300]

    def ids(self) -> list[str]:
        return [headers["webhook-id"] for headers, _, _ in self.posts]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    hook = Receiver()
    app = web.Application()
    app.router.add_post("/hook", hook.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    hook.url = f"http://{host}:{port}/hook"
    yield hook
    await runner.cleanup()


@pytest.fixture
def settings(broker, redis_server):
    """Private addresses allowed (the receiver is on 127.0.0.1), and short back-offs."""
    return isolated_settings(broker, redis_server, webhook_sender=True, webhook_allow_private=True,
                             webhook_backoff_seconds=0.05,
                             webhook_backoff_max_seconds=0.2, webhook_retry_seconds=30.0)


async def _secret(http, gateway, key: str | None = None) -> str:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with http.get(f"{gateway.url}/v1/webhooks/secret", headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        return (await resp.json())["secret"]


async def _record(http, gateway, request_id: str, key: str | None = None) -> dict:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with http.get(f"{gateway.url}/v1/requests/{request_id}", headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def _until_webhook(http, gateway, request_id: str, done: str, key: str | None = None) -> dict:
    """The record once its webhook lists event `done` as delivered or given up."""
    record: dict = {}

    async def ended() -> bool:
        nonlocal record
        record = await _record(http, gateway, request_id, key)
        hook = record.get("webhook") or {}
        return done in hook.get("delivered", []) + hook.get("given_up", [])

    await wait_until(ended, timeout=30, what=f"the webhook's {done} event to end")
    return record


async def test_deliveries_are_signed_and_in_order(gateway, start_worker, http, receiver):
    await start_worker()
    secret = await _secret(http, gateway)
    request_id = await submit(http, gateway.url, {"input": {"prompt": "hello webhooks"}, "webhook": receiver.url})
    view = await wait_final(http, gateway.url, request_id)
    record = await _until_webhook(http, gateway, request_id, "completed")

    payloads = receiver.accepted(secret)  # every one verifies with the deployment's secret
    assert [p["type"] for p in payloads] == ["request.start", "request.completed"]
    assert payloads[0]["data"]["status"] == "running"
    assert payloads[1]["data"]["status"] == "succeeded"
    assert payloads[1]["data"]["output"]["text"] == view["output"]["text"]
    assert receiver.ids() == [f"{request_id}.start", f"{request_id}.completed"]
    assert record["webhook"] == {"url": receiver.url, "events": ["start", "completed"], "attempts": 2,
                                 "last_status_code": 200, "last_error": None, "delivered": ["start", "completed"],
                                 "given_up": []}
    with pytest.raises(WebhookVerificationError):  # a forged secret does not verify
        Webhook("whsec_" + "A" * 32).verify(receiver.posts[0][1], receiver.posts[0][0])


async def test_the_filter_is_respected(gateway, start_worker, http, receiver):
    await start_worker()
    request_id = await submit(http, gateway.url, {"input": {"prompt": "only the end"}, "webhook": receiver.url,
                                                  "webhook_events_filter": ["completed"]})
    await _until_webhook(http, gateway, request_id, "completed")
    # Events go in order per request, so a `start` would have come before the `completed`.
    assert [p["type"] for p in receiver.accepted(await _secret(http, gateway))] == ["request.completed"]

    async with http.post(f"{gateway.url}/v1/requests", json={"input": {"prompt": "x"}, "webhook": receiver.url,
                                                              "webhook_events_filter": ["output"]}) as resp:
        assert resp.status == 422  # not offered: refused, never ignored
        assert (await resp.json())["error"]["field"].startswith("webhook_events_filter")


async def test_a_receiver_answering_500_sees_retries_with_the_same_id(gateway, start_worker, http, receiver):
    await start_worker()
    receiver.answers = [500, 500]
    request_id = await submit(http, gateway.url, {"input": {"prompt": "retry me"}, "webhook": receiver.url,
                                                  "webhook_events_filter": ["completed"]})
    record = await _until_webhook(http, gateway, request_id, "completed")
    assert [status for _, _, status in receiver.posts] == [500, 500, 200]
    assert receiver.ids() == [f"{request_id}.completed"] * 3
    assert record["webhook"]["attempts"] == 3
    assert record["webhook"]["last_status_code"] == 200
    assert record["webhook"]["delivered"] == ["completed"]
    assert len(receiver.accepted(await _secret(http, gateway))) == 1


async def _dead_letters(settings, count: int) -> list:
    consumer = AIOKafkaConsumer(settings.webhook_dlq_topic, bootstrap_servers=settings.kafka_bootstrap,
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    try:
        records = []
        async with asyncio.timeout(30):
            while len(records) < count:
                for batch in (await consumer.getmany(timeout_ms=500)).values():
                    records.extend(batch)
        return records
    finally:
        await consumer.stop()


async def test_a_receiver_that_always_fails_gets_its_delivery_dead_lettered(settings, start_worker, http, receiver):
    receiver.always = 500
    async with serve_gateway(settings.model_copy(update={"webhook_retry_seconds": 1.0})) as gateway:
        await start_worker()
        request_id = await submit(http, gateway.url, {"input": {"prompt": "nobody home"}, "webhook": receiver.url,
                                                      "webhook_events_filter": ["completed"]})
        record = await _until_webhook(http, gateway, request_id, "completed")
    assert record["webhook"]["given_up"] == ["completed"]
    assert record["webhook"]["delivered"] == []
    assert record["webhook"]["last_status_code"] == 500
    assert record["webhook"]["attempts"] == len(receiver.posts) >= 2
    [dead] = await _dead_letters(settings, 1)
    headers = dict(dead.headers)
    assert b"answered 500" in headers["llmq-dlq-reason"]
    assert json.loads(dead.value)["id"] == f"{request_id}.completed"
    assert int(headers["llmq-webhook-attempts"]) == len(receiver.posts)


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/hook", "http://10.1.2.3/hook", "http://169.254.169.254/latest",
                                 "http://[::1]/hook", "http://localhost/hook", "ftp://example.com/hook"])
async def test_a_private_address_is_refused_at_submit(broker, redis_server, http, url):
    async with serve_gateway(isolated_settings(broker, redis_server)) as gateway:  # the default: refused
        async with http.post(f"{gateway.url}/v1/requests", json={"input": {"prompt": "x"}, "webhook": url}) as resp:
            assert resp.status == 422, await resp.text()
            error = (await resp.json())["error"]
    assert error["field"] == "webhook"


async def test_a_kafka_request_gets_its_deliveries(settings, gateway, start_worker, http, receiver):
    await start_worker()
    message = RequestMessage(v=1, id="kafka-hook-1", input={"prompt": "from another service"},
                             webhook=receiver.url, webhook_events_filter=["completed"])
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(settings.request_topic, message.to_bytes(), key=b"kafka-hook-1")
    finally:
        await producer.stop()
    await wait_final(http, gateway.url, "kafka-hook-1", not_yet_recorded=True)
    await _until_webhook(http, gateway, "kafka-hook-1", "completed")
    [payload] = receiver.accepted(await _secret(http, gateway))
    assert payload["data"]["id"] == "kafka-hook-1"
    assert payload["data"]["status"] == "succeeded"


async def test_a_kafka_request_to_a_private_address_is_dead_lettered(broker, redis_server, start_worker, http,
                                                                     receiver):
    """On Kafka nothing can refuse the request at submit: it runs, and the sender refuses
    the delivery (dead-lettered with the reason, on the record too)."""
    strict = isolated_settings(broker, redis_server, webhook_sender=True)  # private addresses refused
    async with serve_gateway(strict) as gateway:
        worker_settings = strict.model_dump()
        await start_worker(**{k: worker_settings[k] for k in ("request_topic", "consumer_group", "redis_prefix",
                                                             "webhook_topic")})
        message = RequestMessage(v=1, id="kafka-private-1", input={"prompt": "x"}, webhook=receiver.url)
        producer = AIOKafkaProducer(bootstrap_servers=strict.kafka_bootstrap)
        await producer.start()
        try:
            await producer.send_and_wait(strict.request_topic, message.to_bytes(), key=b"kafka-private-1")
        finally:
            await producer.stop()
        view = await wait_final(http, gateway.url, "kafka-private-1", not_yet_recorded=True)
        record = await _until_webhook(http, gateway, "kafka-private-1", "completed")
    assert view["status"] == "succeeded"
    assert record["webhook"]["given_up"] == ["start", "completed"]
    assert receiver.posts == []
    reasons = [dict(d.headers)["llmq-dlq-reason"] for d in await _dead_letters(strict, 2)]
    assert all(b"loopback" in reason for reason in reasons), reasons


async def test_an_openai_call_takes_a_webhook_in_extra_body(gateway, start_worker, http, receiver):
    await start_worker()
    client = openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key="unused: auth is off here")
    completion = await client.chat.completions.create(
        model="echo", messages=[{"role": "user", "content": "hook me"}],
        extra_body={"webhook": receiver.url, "webhook_events_filter": ["completed"]})
    await wait_until(lambda: _posted(receiver, 1), what="the delivery")
    [payload] = receiver.accepted(await _secret(http, gateway))
    assert payload["data"]["output"]["text"] == completion.choices[0].message.content

    with pytest.raises(openai.BadRequestError) as refused:
        await client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "x"}],
                                             extra_body={"webhook": "gopher://example.com"})
    assert refused.value.body["param"] == "webhook"


async def _posted(receiver: Receiver, count: int) -> bool:
    return len([1 for _, _, status in receiver.posts if status < 300]) >= count


async def test_a_sender_restarted_mid_retry_still_delivers(settings, start_worker, http, receiver):
    receiver.always = 503
    await start_worker()
    async with serve_gateway(settings) as gateway:
        request_id = await submit(http, gateway.url, {"input": {"prompt": "survive"}, "webhook": receiver.url,
                                                      "webhook_events_filter": ["completed"]})
        await wait_until(lambda: _attempts(receiver, 2), what="two failed attempts")
    # That gateway (and its sender) is gone, its event uncommitted; the receiver is back.
    failed = len(receiver.posts)
    receiver.always = None
    async with serve_gateway(settings) as gateway:
        record = await _until_webhook(http, gateway, request_id, "completed")
    assert record["webhook"]["delivered"] == ["completed"]
    assert [status for _, _, status in receiver.posts] == [503] * failed + [200]
    assert set(receiver.ids()) == {f"{request_id}.completed"}  # the same webhook-id throughout


async def _attempts(receiver: Receiver, count: int) -> bool:
    return len(receiver.posts) >= count


@asynccontextmanager
async def _alice_and_bob(broker, redis_server, http, start_worker):
    """A gateway with API keys on (and its webhook sender), a worker on its topics, and two
    keys, alice and bob: (gateway, its settings, the keys, their webhook secrets)."""
    secured = isolated_settings(broker, redis_server, auth=True, webhook_sender=True, webhook_allow_private=True)
    keys = api_keys(secured, "alice", "bob")
    async with serve_gateway(secured) as gateway:
        await start_worker(**{k: getattr(secured, k) for k in ("request_topic", "consumer_group", "redis_prefix",
                                                              "webhook_topic")})
        secrets = [await _secret(http, gateway, keys[name]) for name in ("alice", "bob")]
        yield gateway, secured, keys, secrets


async def test_each_key_signs_with_its_own_secret(broker, redis_server, http, start_worker, receiver):
    async with _alice_and_bob(broker, redis_server, http, start_worker) as (gateway, secured, keys, (alice, bob)):
        async with http.post(f"{gateway.url}/v1/requests", headers={"Authorization": f"Bearer {keys['alice']}"},
                             json={"input": {"prompt": "mine"}, "webhook": receiver.url,
                                   "webhook_events_filter": ["completed"]}) as resp:
            assert resp.status == 202, await resp.text()
            request_id = (await resp.json())["id"]
        await _until_webhook(http, gateway, request_id, "completed", keys["alice"])
        async with http.get(f"{gateway.url}/v1/requests/{request_id}",
                            headers={"Authorization": f"Bearer {keys['bob']}"}) as resp:
            assert resp.status == 404  # nor does bob see its deliveries
    assert alice != bob
    assert llmq_keys(secured, "webhook-secret", "alice").stdout.strip() == alice  # the key's owner reads it there too
    [payload] = receiver.accepted(alice)
    assert payload["data"]["id"] == request_id
    with pytest.raises(WebhookVerificationError):
        receiver.accepted(bob)


async def test_a_request_cancelled_before_it_ran_gets_its_completed_event(gateway, http, receiver):
    # No worker: the request stays queued until the client cancels it, and the gateway,
    # which ends it, queues its `completed` event.
    request_id = await submit(http, gateway.url, {"input": {"prompt": "never mind"}, "webhook": receiver.url})
    async with http.delete(f"{gateway.url}/v1/requests/{request_id}") as resp:
        assert resp.status == 200, await resp.text()
    record = await _until_webhook(http, gateway, request_id, "completed")
    [payload] = receiver.accepted(await _secret(http, gateway))
    assert payload["type"] == "request.completed"
    assert payload["data"]["status"] == "cancelled"
    assert record["webhook"]["delivered"] == ["completed"]


async def test_an_event_delivered_once_is_not_posted_again_on_a_redelivery(settings, gateway, start_worker, http,
                                                                           receiver):
    """The request's message comes again (a worker died after its result and event): the
    worker finds it final and queues its `completed` event again; the sender, seeing it
    delivered on the record, does not POST it a second time."""
    await start_worker()
    message = RequestMessage(v=1, id="twice-1", input={"prompt": "once only"}, webhook=receiver.url,
                             webhook_events_filter=["completed"])
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(settings.request_topic, message.to_bytes(), key=b"twice-1")
        await wait_final(http, gateway.url, "twice-1", not_yet_recorded=True)
        await _until_webhook(http, gateway, "twice-1", "completed")
        await producer.send_and_wait(settings.request_topic, message.to_bytes(), key=b"twice-1")
    finally:
        await producer.stop()

    async def skipped() -> bool:
        async with http.get(f"{gateway.url}/metrics") as resp:
            return 'llmq_webhook_deliveries_total{outcome="skipped"} 1.0' in await resp.text()

    await wait_until(skipped, what="the second event to be passed over")
    assert len(receiver.posts) == 1


# ---- batches ---------------------------------------------------------------------
# A batch's webhook (llmq's extension of OpenAI's POST /v1/batches, sent by the `openai`
# client in `extra_body`) gets `batch.start` when it is validated and `batch.completed`
# when it ends, whatever the end. Its lines get no webhook of their own.


async def _batch(http, gateway, batch_id: str) -> dict:
    async with http.get(f"{gateway.url}/v1/batches/{batch_id}") as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def _until_batch_webhook(http, gateway, batch_id: str, done: str) -> dict:
    """The Batch object once its webhook lists event `done` as delivered or given up."""
    batch: dict = {}

    async def ended() -> bool:
        nonlocal batch
        batch = await _batch(http, gateway, batch_id)
        hook = batch.get("webhook") or {}
        return done in hook.get("delivered", []) + hook.get("given_up", [])

    await wait_until(ended, timeout=30, what=f"the batch webhook's {done} event to end")
    return batch


async def _create_batch(client: openai.AsyncOpenAI, lines: int, **extra_body):
    file_id = await _upload(client, _chat_lines(lines))
    return await client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                                       completion_window="24h", extra_body=extra_body)


async def test_a_batch_gets_signed_start_and_completed_events(settings, gateway, start_worker, http, receiver):
    await start_worker()
    client = _client(gateway.url)
    created = await _create_batch(client, 3, webhook=receiver.url)
    assert created.status == "validating"
    batch = await _wait_batch(client, created.id)
    assert batch.status == "completed", batch
    shown = await _until_batch_webhook(http, gateway, created.id, "completed")

    start, completed = receiver.accepted(await _secret(http, gateway))  # both verify
    assert receiver.ids() == [f"{created.id}.start", f"{created.id}.completed"]
    assert start["type"] == "batch.start"
    assert start["data"]["id"] == created.id and start["data"]["status"] == "in_progress"
    assert start["data"]["request_counts"]["total"] == 3
    assert completed["type"] == "batch.completed"
    assert completed["data"]["status"] == "completed"
    assert completed["data"]["request_counts"] == {"total": 3, "completed": 3, "failed": 0, "cancelled": 0}
    assert completed["data"]["output_file_id"] == batch.output_file_id
    assert shown["webhook"] == {"url": receiver.url, "events": ["start", "completed"], "attempts": 2,
                                "last_status_code": 200, "last_error": None, "delivered": ["start", "completed"],
                                "given_up": []}
    # The delivery state is written on the batch's hash without cutting its lifetime to a request's.
    redis = connect_redis(settings.redis_url)
    try:
        assert await redis.ttl(Keys.of(settings).batch(created.id)) > settings.result_ttl_seconds
    finally:
        await redis.aclose()
    await client.close()


async def test_a_batch_webhook_filter_is_respected(gateway, start_worker, http, receiver):
    await start_worker()
    client = _client(gateway.url)
    created = await _create_batch(client, 2, webhook=receiver.url, webhook_events_filter=["completed"])
    shown = await _until_batch_webhook(http, gateway, created.id, "completed")
    # Events go in order per batch, so a `start` would have come before the `completed`.
    [payload] = receiver.accepted(await _secret(http, gateway))
    assert payload["type"] == "batch.completed" and payload["data"]["status"] == "completed"
    assert shown["webhook"]["events"] == ["completed"] and shown["webhook"]["delivered"] == ["completed"]

    with pytest.raises(openai.BadRequestError) as refused:  # not offered: refused, never ignored
        await _create_batch(client, 1, webhook=receiver.url, webhook_events_filter=["output"])
    assert refused.value.body["param"] == "webhook_events_filter"
    await client.close()


async def test_a_cancelled_batch_says_so_in_its_completed_event(gateway, start_worker, http, receiver):
    await start_worker(echo_token_delay_ms=20, max_in_flight=4)  # slow, so most lines are still queued
    client = _client(gateway.url)
    created = await _create_batch(client, 60, webhook=receiver.url)
    await _wait_batch(client, created.id, until={"in_progress"})
    await client.batches.cancel(created.id)
    batch = await _wait_batch(client, created.id)
    assert batch.status == "cancelled", batch
    await _until_batch_webhook(http, gateway, created.id, "completed")

    payloads = receiver.accepted(await _secret(http, gateway))
    assert [p["type"] for p in payloads] == ["batch.start", "batch.completed"]
    data = payloads[-1]["data"]
    assert data["status"] == "cancelled" and data["cancelled_at"]
    assert data["request_counts"] == batch.request_counts.model_dump()
    assert data["request_counts"]["cancelled"] > 0
    await client.close()


async def test_a_batch_that_fails_validation_gets_only_its_completed_event(gateway, http, receiver):
    client = _client(gateway.url)
    file_id = await _upload(client, _chat_lines(1) + [{**_chat_lines(1)[0], "url": "/v1/completions"}])
    created = await client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                                          completion_window="24h", extra_body={"webhook": receiver.url})
    await _until_batch_webhook(http, gateway, created.id, "completed")
    # Never `in_progress`, so no `start`: events go in order per batch, one would have come first.
    [payload] = receiver.accepted(await _secret(http, gateway))
    assert payload["type"] == "batch.completed"
    assert payload["data"]["status"] == "failed"
    assert payload["data"]["errors"]["data"][0]["code"] == "mismatched_endpoint"
    await client.close()


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/hook", "http://10.1.2.3/hook", "gopher://example.com/hook"])
async def test_a_batch_webhook_to_a_private_address_is_refused_at_create(broker, redis_server, url):
    async with serve_gateway(isolated_settings(broker, redis_server)) as gateway:  # the default: refused
        client = _client(gateway.url)
        with pytest.raises(openai.BadRequestError) as refused:
            await _create_batch(client, 1, webhook=url)
        assert refused.value.body["param"] == "webhook"
        assert [b async for b in client.batches.list()] == []  # nothing was created
        await client.close()


async def test_a_batch_webhook_that_always_fails_is_given_up_on_the_batch(settings, start_worker, http, receiver):
    receiver.always = 500
    async with serve_gateway(settings.model_copy(update={"webhook_retry_seconds": 1.0})) as gateway:
        await start_worker()
        client = _client(gateway.url)
        created = await _create_batch(client, 1, webhook=receiver.url, webhook_events_filter=["completed"])
        shown = await _until_batch_webhook(http, gateway, created.id, "completed")
        await client.close()
    assert shown["status"] == "completed"  # the batch's own end stands, whatever its webhook
    assert shown["webhook"]["given_up"] == ["completed"] and shown["webhook"]["delivered"] == []
    assert shown["webhook"]["last_status_code"] == 500
    assert shown["webhook"]["attempts"] == len(receiver.posts) >= 2
    [dead] = await _dead_letters(settings, 1)
    assert json.loads(dead.value)["id"] == f"{created.id}.completed"
    assert json.loads(dead.value)["subject"] == "batch"


async def test_a_batch_webhook_is_signed_with_its_owners_secret(broker, redis_server, http, start_worker, receiver):
    async with _alice_and_bob(broker, redis_server, http, start_worker) as (gateway, _, keys, (alice, bob)):
        client, other = _client(gateway.url, keys["alice"]), _client(gateway.url, keys["bob"])
        created = await _create_batch(client, 1, webhook=receiver.url, webhook_events_filter=["completed"])
        await wait_until(lambda: _posted(receiver, 1), timeout=30, what="the delivery")
        with pytest.raises(openai.NotFoundError):  # nor does bob see the batch, or its deliveries
            await other.batches.retrieve(created.id)
        await client.close()
        await other.close()
    [payload] = receiver.accepted(alice)
    assert payload["data"]["id"] == created.id
    with pytest.raises(WebhookVerificationError):
        receiver.accepted(bob)
