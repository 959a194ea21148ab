"""The OpenAI-compatible face of the gateway, driven by the official `openai`
client as users' code drives it: `models.list()` lists what the workers serve."""

from __future__ import annotations

import openai
import pytest

from tests.conftest import serve_gateway
from tests.integration.helpers import llmq_keys


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
