"""Bad input over HTTP gets a JSON error with the right status and leaves
nothing behind: no record in Redis, no message on the topic."""

from __future__ import annotations

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

VALID = {"input": {"prompt": "hello"}, "params": {"max_tokens": 4}}


async def _nothing_enqueued(settings, gateway) -> None:
    keys = [k async for k in gateway.redis.scan_iter(match=f"{settings.redis_prefix}:req:*")]
    assert keys == []
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap)
    await consumer.start()
    try:
        partitions = [TopicPartition(settings.request_topic, p) for p in range(settings.request_partitions)]
        assert set((await consumer.end_offsets(partitions)).values()) == {0}
    finally:
        await consumer.stop()


async def _post(http, gateway, data: bytes, content_type: str = "application/json"):
    async with http.post(f"{gateway.url}/v1/requests", data=data, headers={"Content-Type": content_type}) as resp:
        return resp.status, await resp.json()


@pytest.mark.parametrize(
    ("body", "status", "error_type", "field"),
    [
        (b"{not json", 400, "invalid_json", None),
        (b"", 400, "invalid_json", None),
        (b'{"params": {"max_tokens": 4}}', 422, "invalid_request", "input"),
        (b'{"input": {"prompt": 42}}', 422, "invalid_request", "input.prompt"),
        (b'{"input": {"messages": [{"role": "tool", "content": "x"}]}}', 422, "invalid_request", "input.messages.0.role"),
        (b'{"input": "Hello"}', 422, "invalid_request", "input"),
        (b'{"input": {"prompt": "hi"}, "params": {"max_tokens": "16"}}', 422, "invalid_request", "params.max_tokens"),
        (b'{"input": {"prompt": "hi"}, "params": {"temperature": "hot"}}', 422, "invalid_request", "params.temperature"),
        (b'{"input": {"prompt": "hi"}, "colour": "blue"}', 422, "invalid_request", "colour"),
        (b'{"input": {"prompt": "hi", "extra": 1}}', 422, "invalid_request", None),
        (b'{"input": {"prompt": "hi"}, "params": {"max_tokens": 0}}', 422, "invalid_request", "params.max_tokens"),
        (b'{"input": {"prompt": "hi"}, "params": {"max_tokens": 100000}}', 422, "invalid_request", "params.max_tokens"),
        (b'{"input": {"messages": []}}', 422, "invalid_request", "input.messages"),
        (b'[1, 2, 3]', 422, "invalid_request", None),
        (b'{"input": {"prompt": "hi"}, "deadline": "2030-01-01T00:00:00"}', 422, "invalid_request", "deadline"),
        (b'{"input": {"prompt": "hi"}, "deadline": "2020-01-01T00:00:00Z"}', 422, "invalid_request", "deadline"),
    ],
)
async def test_invalid_body_is_refused_with_a_json_error(settings, gateway, http, body, status, error_type, field):
    got_status, got = await _post(http, gateway, body)
    assert got_status == status, got
    assert got["error"]["type"] == error_type
    assert got["error"]["message"]
    if field is not None:
        assert got["error"]["field"] == field
    await _nothing_enqueued(settings, gateway)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"input": {"messages": [{"role": "tool", "content": "x"}]}}',
         "input.messages.0.role: Input should be 'system', 'user' or 'assistant'"),
        (b'{"input": {"messages": []}}', "input.messages: List should have at least 1 item"),
        (b'{"input": "Hello"}', "input: give `prompt` (a string) or `messages` (a list of {role, content})"),
    ],
)
async def test_an_invalid_input_is_named_as_the_client_wrote_it(settings, gateway, http, body, message):
    """The error names the field that is wrong and how, never pydantic's class names."""
    status, got = await _post(http, gateway, body)
    assert status == 422 and got["error"]["message"].startswith(message), got
    assert "Input" not in got["error"]["field"]


async def test_wrong_content_type_is_415(settings, gateway, http):
    status, body = await _post(http, gateway, b"input=hello", "application/x-www-form-urlencoded")
    assert status == 415
    assert body["error"]["type"] == "unsupported_media_type"
    await _nothing_enqueued(settings, gateway)


async def test_prompt_over_the_configured_size_is_413(settings, gateway, http):
    status, body = await _post(http, gateway, b'{"input": {"prompt": "%s"}}' % (b"x" * (settings.max_prompt_chars + 1)))
    assert status == 413
    assert body["error"] == {"type": "prompt_too_large", "field": "input.prompt",
                             "message": f"the prompt is over the limit of {settings.max_prompt_chars} characters"}
    await _nothing_enqueued(settings, gateway)


async def test_body_over_the_size_limit_is_413(settings, gateway, http):
    huge = b'{"input": {"prompt": "%s"}}' % (b"x" * (settings.max_body_bytes + 10))
    status, body = await _post(http, gateway, huge)
    assert status == 413
    assert body["error"]["type"] == "body_too_large"
    await _nothing_enqueued(settings, gateway)


@pytest.mark.parametrize("request_id", ["does-not-exist", "a" * 129, "..%2F..%2Fetc", "x y"])
async def test_unknown_request_id_is_404(gateway, http, request_id):
    for method in ("GET", "DELETE"):
        async with http.request(method, f"{gateway.url}/v1/requests/{request_id}") as resp:
            assert resp.status == 404
            assert (await resp.json())["error"]["type"] == "not_found"


@pytest.mark.parametrize("wait", ["-1", "soon", "nan", "inf"])
async def test_bad_wait_is_422(gateway, http, wait):
    async with http.get(f"{gateway.url}/v1/requests/abc", params={"wait": wait}) as resp:
        assert resp.status == 422
        assert (await resp.json())["error"]["field"] == "wait"


async def test_unknown_route_and_method_are_json_errors(gateway, http):
    async with http.get(f"{gateway.url}/v2/nothing") as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]["type"] == "not_found"
    async with http.put(f"{gateway.url}/v1/requests") as resp:
        assert resp.status == 405
        assert (await resp.json())["error"]["type"] == "method_not_allowed"
        assert {method.strip() for method in resp.headers["Allow"].split(",")} == {"POST"}


async def test_valid_request_after_bad_ones_is_accepted(gateway, http):
    await _post(http, gateway, b"garbage")
    status, body = await _post(http, gateway, b'{"input": {"prompt": "fine"}}')
    assert status == 202
    assert body["status"] == "queued"
    assert body["status_url"] == f"/v1/requests/{body['id']}"
