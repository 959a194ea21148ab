"""The OpenAI-compatible face of the gateway, driven by the official `openai`
client as users' code drives it: `models.list()` lists what the workers serve."""

from __future__ import annotations

import asyncio

import openai
import pytest

from tests.conftest import serve_gateway
from tests.integration.helpers import llmq_keys, wait_until


async def test_models_list_shows_what_the_workers_serve(gateway, start_worker):
    client = openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key="unused: auth is off here")
    assert [model.id async for model in client.models.list()] == []  # no worker has started yet

    await start_worker()
    models = [model async for model in client.models.list()]
    assert [(m.id, m.object, m.owned_by) for m in models] == [("echo", "model", "llmq")]
    assert models[0].created > 0
    await client.close()


async def test_models_list_needs_a_key_when_auth_is_on(settings, start_worker):
    secured = settings.model_copy(update={"auth": True})
    made = llmq_keys(secured, "create", "sdk-user")
    assert made.returncode == 0, made.stderr
    await start_worker()
    async with serve_gateway(secured) as gateway:
        with pytest.raises(openai.AuthenticationError):
            await openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key="llmq_not-a-real-key").models.list()
        client = openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key=made.stdout.strip())
        assert [model.id async for model in client.models.list()] == ["echo"]
        await client.close()


# ---- completions and chat, through the queue ----------------------------------

WORDS = " ".join(f"w{i}" for i in range(30))


def _client(gateway, **options) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key=options.pop("api_key", "unused: auth is off"),
                              max_retries=0, **options)


async def _record(http, gateway, response_id: str) -> dict:
    request_id = response_id.split("-", 1)[1]
    async with http.get(f"{gateway.url}/v1/requests/{request_id}") as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def test_chat_and_completions_answer_through_the_queue(gateway, http, start_worker):
    await start_worker()
    client = _client(gateway)
    chat = await client.chat.completions.create(
        model="echo", messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}])
    assert chat.object == "chat.completion" and chat.model == "echo" and chat.id.startswith("chatcmpl-")
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == "system: be brief\nuser: hello there"  # the echo engine's answer
    assert chat.choices[0].finish_reason == "stop"
    record = await _record(http, gateway, chat.id)  # the same request, recorded as any other
    assert record["status"] == "succeeded" and chat.usage.model_dump(exclude_none=True) == record["usage"]

    text = await client.completions.create(model="echo", prompt=WORDS, max_tokens=5, extra_body={"priority": 3})
    assert text.object == "text_completion" and text.choices[0].text == "w0 w1 w2 w3 w4"
    assert text.choices[0].finish_reason == "length" and text.usage.completion_tokens == 5
    await client.close()


async def test_streamed_chunks_add_up_to_the_final_text(gateway, http, start_worker):
    await start_worker(echo_token_delay_ms=20)
    client = _client(gateway)
    stream = await client.chat.completions.create(model="echo", messages=[{"role": "user", "content": WORDS}],
                                                  stream=True, stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]
    contents = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(contents) > 5  # token by token, not one piece at the end
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None  # the usage chunk comes last
    record = await _record(http, gateway, chunks[0].id)
    assert "".join(contents) == record["output"]["text"] == f"user: {WORDS}"
    assert chunks[-1].usage.model_dump(exclude_none=True) == record["usage"]

    completion = await client.completions.create(model="echo", prompt=WORDS, max_tokens=10, stream=True)
    pieces = [chunk async for chunk in completion]
    assert "".join(p.choices[0].text for p in pieces) == " ".join(WORDS.split()[:10])
    assert pieces[-1].choices[0].finish_reason == "length" and all(p.usage is None for p in pieces)
    await client.close()


async def test_the_torch_engine_streams_its_final_text(gateway, http, start_worker, tiny_model_dir):
    await start_worker(engine="torch", model=str(tiny_model_dir))
    client = _client(gateway)
    stream = await client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "Hi"}],
                                                  max_tokens=40, temperature=0, stream=True)
    chunks = [chunk async for chunk in stream]
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    record = await _record(http, gateway, chunks[0].id)
    assert record["usage"]["completion_tokens"] == 40 and streamed == record["output"]["text"]
    await client.close()


async def test_what_llmq_cannot_do_is_refused_in_openais_shape(gateway, start_worker):
    await start_worker()
    client = _client(gateway)
    with pytest.raises(openai.NotFoundError) as not_served:
        await client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert not_served.value.code == "model_not_found" and not_served.value.param == "model"
    for extra, param in (({"logprobs": True}, "logprobs"), ({"n": 2}, "n"),
                         ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
                         ({"response_format": {"type": "json_object"}}, "response_format"),
                         ({"temperature": 7}, "temperature")):
        with pytest.raises(openai.BadRequestError) as refused:
            await client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "hi"}],
                                                 **extra)
        assert refused.value.param == param, refused.value.body
    with pytest.raises(openai.BadRequestError) as many:
        await client.completions.create(model="echo", prompt=["one", "two"])
    assert many.value.param == "prompt"
    await client.close()


async def test_keys_and_rates_apply_to_the_openai_endpoints(settings, http, start_worker):
    secured = settings.model_copy(update={"auth": True, "rate_limit_rps": 0.01, "rate_limit_burst": 1})
    key = llmq_keys(secured, "create", "sdk-user").stdout.strip()
    other = llmq_keys(secured, "create", "someone-else").stdout.strip()
    await start_worker()
    async with serve_gateway(secured) as gateway:
        with pytest.raises(openai.AuthenticationError):
            await _client(gateway, api_key="llmq_wrong").completions.create(model="echo", prompt="hi")
        client = _client(gateway, api_key=key)
        answer = await client.completions.create(model="echo", prompt="hi")
        with pytest.raises(openai.RateLimitError):
            await client.completions.create(model="echo", prompt="hi again")
        # the request is this key's: another key cannot read it
        request_id = answer.id.split("-", 1)[1]
        headers = {"Authorization": f"Bearer {other}"}
        async with http.get(f"{gateway.url}/v1/requests/{request_id}", headers=headers) as resp:
            assert resp.status == 404
        await client.close()


async def test_a_client_that_hangs_up_stops_the_generation(gateway, http, start_worker):
    worker = await start_worker(echo_token_delay_ms=50)
    client = _client(gateway)
    stream = await client.chat.completions.create(model="echo", messages=[{"role": "user", "content": WORDS * 4}],
                                                  stream=True)
    chunks = []
    async for chunk in stream:
        chunks.append(chunk)
        if len(chunks) == 3:
            assert worker.engine.running == 1
            break
    await stream.close()
    await wait_until(lambda: _idle(worker), timeout=10, what="the engine to drop the request")
    record = await _record(http, gateway, chunks[0].id)
    assert record["status"] == "cancelled"

    # and a client that stops waiting for a non-streamed answer
    task = asyncio.create_task(client.chat.completions.create(
        model="echo", messages=[{"role": "user", "content": WORDS * 4}]))
    await wait_until(lambda: _busy(worker), timeout=10, what="the engine to start it")
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await wait_until(lambda: _idle(worker), timeout=10, what="the engine to drop the waited-for request")
    await client.close()


async def _idle(worker) -> bool:
    return worker.engine.running == 0


async def _busy(worker) -> bool:
    return worker.engine.running == 1


async def test_a_call_with_no_result_in_time_is_cancelled_with_a_clear_error(settings, http):
    hurried = settings.model_copy(update={"completion_timeout_seconds": 1.0})
    async with serve_gateway(hurried) as gateway:  # no worker: nothing will answer
        with pytest.raises(openai.APIStatusError) as timed_out:
            await _client(gateway).completions.create(model="echo", prompt="hello")
        assert timed_out.value.status_code == 504 and timed_out.value.code == "timeout"
        request_id = timed_out.value.response.headers["x-request-id"]
        async with http.get(f"{gateway.url}/v1/requests/{request_id}") as resp:
            assert (await resp.json())["status"] == "cancelled"  # no worker will start it later


async def test_a_retried_call_with_an_idempotency_key_runs_once(gateway, http, start_worker):
    worker = await start_worker()
    client = _client(gateway)
    headers = {"Idempotency-Key": "retry-me-1"}
    first = await client.completions.create(model="echo", prompt="once only", extra_headers=headers)
    again = await client.completions.create(model="echo", prompt="once only", extra_headers=headers)
    assert again.id == first.id and again.choices[0].text == first.choices[0].text == "once only"
    assert worker.metrics.stats.fetched == 1
    with pytest.raises(openai.BadRequestError) as reused:
        await client.completions.create(model="echo", prompt="something else", extra_headers=headers)
    assert reused.value.code == "idempotency_key_reused"
    await client.close()
