"""The result cache: a repeat of a deterministic request (temperature 0, or a
seed) by the same API key is answered by the gateway from Redis, with the same
text, a record that says so, and no new Kafka message; other keys, sampled
requests, `Cache-Control: no-cache`, changed parameters, expired and evicted
answers all go through the queue. Real broker, Redis, gateway and echo worker."""

from __future__ import annotations

import asyncio

import openai
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from tests.conftest import serve_gateway
from tests.integration.helpers import api_keys, sse_events

GREEDY = {"input": {"prompt": "the same question again"}, "params": {"max_tokens": 8, "temperature": 0}}
WAIT = {"Prefer": "wait=20"}


async def messages_on(settings) -> int:
    """How many messages the request topic holds: the sum of its partitions' end
    offsets (requests here are produced one at a time, so the dev broker's count is exact)."""
    probe = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False)
    await probe.start()
    try:
        ends = await probe.end_offsets([TopicPartition(settings.request_topic, p)
                                        for p in range(settings.request_partitions)])
        return sum(ends.values())
    finally:
        await probe.stop()


async def ask(http, base: str, body: dict, headers: dict | None = None) -> tuple[dict, str | None]:
    """POST /v1/requests waiting for the result: (the record, its Cache-Status)."""
    async with http.post(f"{base}/v1/requests", json=body, headers={**WAIT, **(headers or {})}) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json(), resp.headers.get("Cache-Status")


async def cache_lookups(http, base: str) -> dict[str, float]:
    """llmq_gateway_cache_lookups_total by result, as /metrics shows it."""
    async with http.get(f"{base}/metrics") as resp:
        text = await resp.text()
    prefix = 'llmq_gateway_cache_lookups_total{result="'
    return {line[len(prefix):].split('"')[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line.startswith(prefix)}


async def test_a_repeated_greedy_request_is_answered_from_the_cache(settings, gateway, http, start_worker):
    await start_worker()
    first, status = await ask(http, gateway.url, GREEDY)
    assert (first["status"], first["cache_hit"], status) == ("succeeded", False, "llmq; fwd=uri-miss")
    assert first["output"]["text"] == "the same question again"
    sent = await messages_on(settings)
    assert sent == 1

    again, status = await ask(http, gateway.url, GREEDY)
    assert (again["status"], again["cache_hit"], status) == ("succeeded", True, "llmq; hit")
    assert again["id"] != first["id"]
    assert again["output"] == first["output"] and again["usage"] == first["usage"]
    assert again["model"] == first["model"] == "echo"

    # Without waiting: 202 already final; GET and the SSE stream show the cached answer.
    async with http.post(f"{gateway.url}/v1/requests", json=GREEDY) as resp:
        assert resp.status == 202 and resp.headers["Cache-Status"] == "llmq; hit"
        accepted = await resp.json()
    assert accepted["status"] == "succeeded"
    async with http.get(f"{gateway.url}{accepted['status_url']}") as resp:
        view = await resp.json()
    assert (view["status"], view["cache_hit"], view["output"]) == ("succeeded", True, first["output"])
    async with http.get(f"{gateway.url}/v1/requests/{accepted['id']}/stream") as resp:
        events = [event async for event in sse_events(resp)]
    assert "".join(e["data"]["text"] for e in events if e["event"] == "delta") == first["output"]["text"]
    assert events[-1]["event"] == "done" and events[-1]["data"]["cache_hit"] is True

    assert await messages_on(settings) == sent  # nothing more reached the queue
    assert await cache_lookups(http, gateway.url) == {"miss": 1.0, "hit": 2.0}


@pytest.fixture
def auth_settings(settings):
    return settings.model_copy(update={"auth": True})


async def test_another_api_key_never_gets_a_cached_answer(settings, auth_settings, secured, http, start_worker):
    keys = {name: {"Authorization": f"Bearer {key}"} for name, key in api_keys(auth_settings, "alice", "bob").items()}
    await start_worker()
    alice_first, _ = await ask(http, secured.url, GREEDY, keys["alice"])
    alice_again, status = await ask(http, secured.url, GREEDY, keys["alice"])
    assert (alice_again["cache_hit"], status) == (True, "llmq; hit")
    sent = await messages_on(settings)

    bob_first, status = await ask(http, secured.url, GREEDY, keys["bob"])
    assert (bob_first["cache_hit"], status) == (False, "llmq; fwd=uri-miss")
    assert bob_first["output"] == alice_first["output"]  # the worker ran it again, for bob
    assert await messages_on(settings) == sent + 1
    bob_again, status = await ask(http, secured.url, GREEDY, keys["bob"])
    assert (bob_again["cache_hit"], status) == (True, "llmq; hit")  # from bob's own answer

    # A cached answer's record is its key's like any other: 404 to the other key.
    async with http.get(f"{secured.url}/v1/requests/{alice_again['id']}", headers=keys["bob"]) as resp:
        assert resp.status == 404


async def test_only_a_repeat_of_a_deterministic_request_may_hit(settings, gateway, http, start_worker):
    await start_worker()
    await ask(http, gateway.url, GREEDY)

    # Cache-Control: no-cache (or no-store) asks for a fresh run.
    for directive in ("no-cache", "max-age=0, No-Store"):
        fresh, status = await ask(http, gateway.url, GREEDY, {"Cache-Control": directive})
        assert (fresh["cache_hit"], status) == (False, "llmq; fwd=bypass")

    # Changed parameters, model or input: another answer.
    for changed in ({**GREEDY, "params": {**GREEDY["params"], "max_tokens": 3}},
                    {**GREEDY, "params": {**GREEDY["params"], "stop": ["again"]}},
                    {**GREEDY, "input": {"messages": [{"role": "user", "content": "the same question again"}]}},
                    {**GREEDY, "model": "echo"}):
        other, status = await ask(http, gateway.url, changed)
        assert (other["cache_hit"], status) == (False, "llmq; fwd=uri-miss"), changed

    # Sampled without a seed: never looked up, however often repeated.
    sampled = {**GREEDY, "params": {"max_tokens": 8, "temperature": 0.7}}
    for _ in range(2):
        view, status = await ask(http, gateway.url, sampled)
        assert (view["cache_hit"], status) == (False, None)
    # Sampled with a seed is repeatable: the repeat hits.
    seeded = {**GREEDY, "params": {"max_tokens": 8, "temperature": 0.7, "seed": 7}}
    assert (await ask(http, gateway.url, seeded))[0]["cache_hit"] is False
    assert (await ask(http, gateway.url, seeded))[0]["cache_hit"] is True

    # Spelling doesn't matter: defaults written out, keys in another order.
    spelled = {"params": {"temperature": 0.0, "top_p": 1, "max_tokens": 8},
               "input": {"prompt": "the same question again"}}
    assert (await ask(http, gateway.url, spelled))[0]["cache_hit"] is True

    # 1 greedy + 2 bypassed + 4 changed + 2 sampled + 1 seeded ran; nothing else reached the queue.
    assert await messages_on(settings) == 10
    assert await cache_lookups(http, gateway.url) == {"miss": 6.0, "bypass": 2.0, "uncacheable": 2.0, "hit": 2.0}


async def test_no_store_keeps_nothing_and_no_cache_stores_a_fresh_answer(settings, gateway, http, start_worker):
    await start_worker()
    private = {**GREEDY, "input": {"prompt": "keep nothing of this"}}
    view, status = await ask(http, gateway.url, private, {"Cache-Control": "no-store"})
    assert (view["status"], view["cache_hit"], status) == ("succeeded", False, "llmq; fwd=bypass")
    assert (await ask(http, gateway.url, private))[1] == "llmq; fwd=uri-miss"  # nothing was stored

    fresh = {**GREEDY, "input": {"prompt": "run this afresh"}}
    assert (await ask(http, gateway.url, fresh, {"Cache-Control": "no-cache"}))[1] == "llmq; fwd=bypass"
    assert (await ask(http, gateway.url, fresh))[1] == "llmq; hit"  # the fresh answer was stored
    assert await messages_on(settings) == 3


async def test_the_openai_client_gets_a_cached_answer(settings, gateway, http, start_worker):
    await start_worker()
    client = openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key="unused: auth is off", max_retries=0)
    call = {"model": "echo", "messages": [{"role": "user", "content": "hello cache"}], "temperature": 0}
    first = await client.chat.completions.with_raw_response.create(**call)
    assert first.headers["cache-status"] == "llmq; fwd=uri-miss"
    sent = await messages_on(settings)

    again = await client.chat.completions.with_raw_response.create(**call)
    assert again.headers["cache-status"] == "llmq; hit"
    assert again.parse().choices[0].message.content == first.parse().choices[0].message.content == "user: hello cache"
    assert again.parse().usage == first.parse().usage
    request_id = again.headers["x-request-id"]
    async with http.get(f"{gateway.url}/v1/requests/{request_id}") as resp:
        assert (await resp.json())["cache_hit"] is True

    stream = await client.chat.completions.create(**call, stream=True, stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "user: hello cache"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].usage == first.parse().usage

    assert await messages_on(settings) == sent
    await client.close()


async def test_an_answer_is_reused_only_within_its_ttl(settings, http, start_worker):
    short = settings.model_copy(update={"cache_ttl_seconds": 1})
    await start_worker(cache_ttl_seconds=1)
    async with serve_gateway(short) as gateway:
        await ask(http, gateway.url, GREEDY)
        assert (await ask(http, gateway.url, GREEDY))[0]["cache_hit"] is True
        await asyncio.sleep(1.5)
        expired, status = await ask(http, gateway.url, GREEDY)
        assert (expired["cache_hit"], status) == (False, "llmq; fwd=uri-miss")
        assert await messages_on(settings) == 2


async def test_the_cache_keeps_a_bounded_number_of_answers(settings, http, start_worker):
    bounded = {"cache_max_entries": 2, "cache_max_entry_bytes": 10}
    await start_worker(**bounded)
    prompts = [{**GREEDY, "input": {"prompt": word}} for word in ("alpha", "bravo", "charlie")]
    async with serve_gateway(settings.model_copy(update=bounded)) as gateway:
        for body in prompts:
            await ask(http, gateway.url, body)
        # Two kept: storing the third dropped the oldest.
        hits = [(await ask(http, gateway.url, body))[0]["cache_hit"] for body in reversed(prompts)]
        assert hits == [True, True, False]
        # An answer over LLMQ_CACHE_MAX_ENTRY_BYTES is not kept.
        long = {**GREEDY, "input": {"prompt": "eleven bytes"}}
        await ask(http, gateway.url, long)
        assert (await ask(http, gateway.url, long))[0]["cache_hit"] is False


async def test_no_cache_with_a_ttl_of_zero(settings, http, start_worker):
    off = settings.model_copy(update={"cache_ttl_seconds": 0})
    await start_worker(cache_ttl_seconds=0)
    async with serve_gateway(off) as gateway:
        for _ in range(2):
            view, status = await ask(http, gateway.url, GREEDY)
            assert (view["cache_hit"], status) == (False, None)
        assert await messages_on(settings) == 2


async def test_a_cached_answer_keeps_to_the_idempotency_key_and_the_rate(settings, http, start_worker):
    """A hit is a request like any other: an Idempotency-Key's retry answers with the
    same request, and it takes a token from the key's rate."""
    limited = settings.model_copy(update={"auth": True, "rate_limit_rps": 0.01, "rate_limit_burst": 3})
    key = {"Authorization": f"Bearer {api_keys(limited, 'carol')['carol']}"}
    await start_worker()
    async with serve_gateway(limited) as gateway:
        await ask(http, gateway.url, GREEDY, key)
        once = {**key, "Idempotency-Key": "order-1"}
        hit, status = await ask(http, gateway.url, GREEDY, once)
        assert (hit["cache_hit"], status) == (True, "llmq; hit")
        async with http.post(f"{gateway.url}/v1/requests", json=GREEDY, headers={**WAIT, **once}) as resp:
            assert resp.status == 200 and resp.headers["Idempotent-Replayed"] == "true"
            assert (await resp.json())["id"] == hit["id"]
        # A replay takes no token; a third admitted request (a hit) takes the burst's last,
        # and the next one, hit or not, is over the rate.
        assert (await ask(http, gateway.url, GREEDY, key))[0]["cache_hit"] is True
        async with http.post(f"{gateway.url}/v1/requests", json=GREEDY, headers=key) as resp:
            assert resp.status == 429 and (await resp.json())["error"]["type"] == "rate_limited"
        assert await messages_on(settings) == 1


async def test_the_torch_engine_answer_is_cached(settings, gateway, http, start_worker, tiny_model_dir):
    await start_worker(engine="torch", model=str(tiny_model_dir), device="cpu")
    body = {"model": "tiny-llama", "input": {"messages": [{"role": "user", "content": "A queue is"}]},
            "params": {"max_tokens": 12, "temperature": 0}}
    first, _ = await ask(http, gateway.url, body)
    assert first["status"] == "succeeded" and first["usage"]["completion_tokens"] == 12
    again, status = await ask(http, gateway.url, body)
    assert (again["cache_hit"], status) == (True, "llmq; hit")
    assert (again["output"], again["usage"], again["model"]) == (first["output"], first["usage"], "tiny-llama")
    assert await messages_on(settings) == 1
