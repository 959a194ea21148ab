"""The echo engine answers with its input; words stand in for tokens."""

from __future__ import annotations

import asyncio

import pytest

from shared.schema import ChatMessage, Params
from workers.engines.base import GenerationRequest, collect
from workers.engines.echo import EchoEngine
from workers.settings import WorkerSettings


def engine(**settings) -> EchoEngine:
    return EchoEngine(WorkerSettings(engine="echo", **settings))


def request(prompt=None, rid="r", messages=None, **params) -> GenerationRequest:
    return GenerationRequest(rid, Params(**params), prompt=prompt, messages=messages)


@pytest.mark.asyncio
async def test_prompt_is_echoed():
    result = await collect(engine(), request("the quick brown fox"))
    assert (result.text, result.finish_reason, result.error) == ("the quick brown fox", "stop", None)
    assert (result.prompt_tokens, result.completion_tokens) == (4, 4)


@pytest.mark.asyncio
async def test_max_tokens_cuts_with_length():
    result = await collect(engine(), request("one two three four five", max_tokens=3))
    assert (result.text, result.finish_reason, result.completion_tokens) == ("one two three", "length", 3)
    assert result.prompt_tokens == 5


@pytest.mark.asyncio
async def test_stop_string_cuts_before_it():
    result = await collect(engine(), request("alpha beta. gamma delta", stop=[".", "delta"]))
    assert (result.text, result.finish_reason, result.completion_tokens) == ("alpha beta", "stop", 2)


@pytest.mark.asyncio
async def test_stop_beyond_max_tokens_still_ends_with_length():
    result = await collect(engine(), request("a b c d e STOP f", max_tokens=2, stop=["STOP"]))
    assert (result.text, result.finish_reason) == ("a b", "length")


@pytest.mark.asyncio
async def test_messages_are_echoed_as_role_lines_and_order_is_kept():
    messages = [ChatMessage(role="system", content="be brief"), ChatMessage(role="user", content="hi")]
    echo = engine()
    results = await asyncio.gather(collect(echo, request("first", rid="1")), collect(echo, request(rid="2", messages=messages)))
    assert [r.request_id for r in results] == ["1", "2"]
    assert results[1].text == "system: be brief\nuser: hi"


def test_model_name_is_echo():
    assert engine().model_name == "echo"
