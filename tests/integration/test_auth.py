"""API keys: no key, no access; each request belongs to the key that made it
(another key gets 404, as for an id that doesn't exist); per-key rate limits;
queue admission.
Keys are made with the real `llmq keys` command against the test's Redis."""

from __future__ import annotations

import asyncio
import json

import pytest

from deploy.devstack import free_port
from tests.conftest import serve_gateway
from tests.integration.helpers import api_keys, llmq, llmq_keys, wait_final, wait_until

BODY = {"input": {"prompt": "mine alone"}, "params": {"max_tokens": 4}}


@pytest.fixture
def auth_settings(settings):
    return settings.model_copy(update={"auth": True, "rate_limit_rps": 1.0, "rate_limit_burst": 3})


@pytest.fixture
def alice_and_bob(auth_settings):
    return {name: {"Authorization": f"Bearer {key}"} for name, key in api_keys(auth_settings, "alice", "bob").items()}


async def test_no_or_wrong_key_is_401(secured, http):
    for headers in ({}, {"Authorization": "Bearer llmq_not-a-real-key"}, {"Authorization": "Basic abc"}):
        async with http.post(f"{secured.url}/v1/requests", json=BODY, headers=headers) as resp:
            assert resp.status == 401
            assert resp.headers["WWW-Authenticate"] == "Bearer"
            assert (await resp.json())["error"]["type"] == "unauthorized"
        async with http.get(f"{secured.url}/v1/requests/anything", headers=headers) as resp:
            assert resp.status == 401
    async with http.get(f"{secured.url}/healthz") as resp:
        assert resp.status == 200  # operational endpoints stay open


async def test_a_request_is_visible_only_to_its_key(secured, http, alice_and_bob, start_worker):
    alice, bob = alice_and_bob["alice"], alice_and_bob["bob"]
    async with http.post(f"{secured.url}/v1/requests", json=BODY, headers=alice) as resp:
        assert resp.status == 202
        request_id = (await resp.json())["id"]

    for method in ("GET", "DELETE"):
        async with http.request(method, f"{secured.url}/v1/requests/{request_id}", headers=bob) as resp:
            assert resp.status == 404
            assert (await resp.json()) == {"error": {"type": "not_found", "message": "no such request"}}

    await start_worker()
    http.headers.update(alice)  # wait_final polls with alice's key
    view = await wait_final(http, secured.url, request_id)
    assert view["status"] == "succeeded" and view["output"]["text"] == "mine alone"
    assert "tenant" not in view


async def test_revoked_key_stops_working(secured, http, alice_and_bob, auth_settings):
    secured.api_keys.cache_seconds = 0  # no wait for the in-process cache to lapse
    async with http.post(f"{secured.url}/v1/requests", json=BODY, headers=alice_and_bob["bob"]) as resp:
        assert resp.status == 202
    listed = llmq_keys(auth_settings, "list")
    assert [line.split("\t")[0] for line in listed.stdout.splitlines()] == ["alice", "bob"]
    assert llmq_keys(auth_settings, "revoke", "bob").returncode == 0
    async with http.post(f"{secured.url}/v1/requests", json=BODY, headers=alice_and_bob["bob"]) as resp:
        assert resp.status == 401
    assert llmq_keys(auth_settings, "revoke", "bob").returncode == 1  # no such key any more


async def test_rate_limit_per_key_answers_429_with_retry_after(secured, http, alice_and_bob):
    statuses = []
    for _ in range(6):
        async with http.post(f"{secured.url}/v1/requests", json=BODY, headers=alice_and_bob["alice"]) as resp:
            statuses.append(resp.status)
            if resp.status == 429:
                assert int(resp.headers["Retry-After"]) >= 1
                assert (await resp.json())["error"]["type"] == "rate_limited"
    assert statuses[:3] == [202, 202, 202]  # the burst
    assert 429 in statuses[3:]
    # Another key has its own bucket.
    async with http.post(f"{secured.url}/v1/requests", json=BODY, headers=alice_and_bob["bob"]) as resp:
        assert resp.status == 202
    keys = [k async for k in secured.redis.scan_iter(match=f"{secured.settings.redis_prefix}:req:*")]
    assert len(keys) == statuses.count(202) + 1  # a refused request leaves no record


async def test_submits_are_refused_while_the_queue_is_over_its_bound(settings, http, start_worker):
    bounded = settings.model_copy(update={"max_queue_depth": 5})
    async with serve_gateway(bounded) as gateway:
        for i in range(5):
            async with http.post(f"{gateway.url}/v1/requests", json=BODY) as resp:
                assert resp.status == 202
        # The gateway reads the workers' lag once a second.
        await wait_until(lambda: asyncio.sleep(0, gateway.queue_depth >= 5), 15, "the gateway to see the backlog")
        async with http.post(f"{gateway.url}/v1/requests", json=BODY) as resp:
            assert resp.status == 429
            assert resp.headers["Retry-After"] == "5"
            assert (await resp.json())["error"]["type"] == "queue_full"

        await start_worker()  # drains the backlog; admission opens again
        await wait_until(lambda: asyncio.sleep(0, gateway.queue_depth == 0), 30, "the backlog to drain")
        async with http.post(f"{gateway.url}/v1/requests", json=BODY) as resp:
            assert resp.status == 202


async def test_the_llmq_client_submits_gets_and_cancels_with_a_key(secured, auth_settings, alice_and_bob, start_worker):
    key = alice_and_bob["alice"]["Authorization"].removeprefix("Bearer ")
    await start_worker()
    done = await asyncio.to_thread(llmq, auth_settings, "submit", "hello from a shell", "--text", "--url", secured.url,
                                   "--api-key", key)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "hello from a shell\n"

    # LLMQ_API_KEY works as well as the flag; --wait 0 answers with the accepted id at once.
    queued = await asyncio.to_thread(llmq, auth_settings, "submit", "later", "--wait", "0", "--url", secured.url,
                                     LLMQ_API_KEY=key)
    request_id = json.loads(queued.stdout)["id"]
    got = await asyncio.to_thread(llmq, auth_settings, "get", request_id, "--wait", "30", "--url", secured.url,
                                  LLMQ_API_KEY=key)
    assert got.returncode == 0 and json.loads(got.stdout)["status"] == "succeeded", got.stderr
    finished = await asyncio.to_thread(llmq, auth_settings, "cancel", request_id, "--url", secured.url,
                                       LLMQ_API_KEY=key)
    assert finished.returncode == 1
    assert finished.stderr.startswith("llmq cancel: DELETE ") and "409 already_finished" in finished.stderr


@pytest.mark.parametrize("case", ["no key", "wrong key", "no gateway", "no redis"])
async def test_every_llmq_command_error_is_one_clear_line(secured, auth_settings, case):
    if case == "no redis":
        result = await asyncio.to_thread(llmq, auth_settings, "keys", "list",
                                         LLMQ_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
        expected = "llmq keys: cannot reach Redis at redis://127.0.0.1:"
    else:
        url = f"http://127.0.0.1:{free_port()}" if case == "no gateway" else secured.url
        key = ["--api-key", "llmq_not-a-real-key"] if case == "wrong key" else []
        result = await asyncio.to_thread(llmq, auth_settings, "submit", "hi", "--url", url, *key)
        expected = {"no key": "401 unauthorized: send an API key",
                    "wrong key": "401 unauthorized: the API key is unknown or revoked",
                    "no gateway": f"cannot reach the gateway at {url}"}[case]
    assert result.returncode == 1
    assert len(result.stderr.splitlines()) == 1 and expected in result.stderr, result.stderr
