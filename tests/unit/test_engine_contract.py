"""What every engine promises the worker (workers/engines/base.py), written once
and run on each engine that can run here: echo (a token delay stands in for
decoding), torch on the tiny model, and vLLM on the tiny model where it is
installed (`make install-vllm` makes .venv-vllm; run there with
`.venv-vllm/bin/python -m pytest tests/unit/test_engine_contract.py`)."""

from __future__ import annotations

import asyncio
import importlib.util

import pytest

from shared.schema import Params
from workers.engines import load_engine
from workers.engines.base import GenerationRequest, collect
from workers.settings import WorkerSettings

LONG_PROMPT = " ".join(f"w{i}" for i in range(400))  # echo: 400 tokens to give back


ENGINES = ["echo", "torch"] + (["vllm"] if importlib.util.find_spec("vllm") else [])


@pytest.fixture(params=ENGINES)
async def make_engine(request, tiny_model_dir):
    started = []

    async def make(**overrides):
        base = {"echo": dict(engine="echo", echo_token_delay_ms=5),
                "torch": dict(engine="torch", model=str(tiny_model_dir), device="cpu"),
                "vllm": dict(engine="vllm", model=str(tiny_model_dir))}[request.param]
        engine = load_engine(WorkerSettings(**base, **overrides))
        await engine.start()
        started.append(engine)
        return engine

    yield make
    for engine in started:
        await engine.close()


def long_request(rid="long", max_tokens=400) -> GenerationRequest:
    return GenerationRequest(rid, Params(max_tokens=max_tokens, temperature=0), prompt=LONG_PROMPT)


def short_request(rid="short", max_tokens=3) -> GenerationRequest:
    return GenerationRequest(rid, Params(max_tokens=max_tokens, temperature=0), prompt="a b c d e f")


async def first_delta(stream) -> None:
    async for output in stream:
        if output.completion_tokens:
            return


@pytest.mark.asyncio
async def test_deltas_add_up_to_the_final_text(make_engine):
    engine = await make_engine()
    deltas, counts, result = [], [], None
    async for output in engine.generate(long_request(max_tokens=40)):
        deltas.append(output.delta)
        counts.append(output.completion_tokens)
        result = output.result
    assert result is not None and result.error is None
    assert "".join(deltas) == result.text
    assert result.completion_tokens == 40 and result.finish_reason == "length"
    assert len(deltas) > 1, "tokens should arrive as they are generated, not all at the end"
    assert counts == sorted(counts) and counts[-1] == 40


@pytest.mark.asyncio
async def test_a_short_request_does_not_wait_for_a_long_one(make_engine):
    engine = await make_engine()
    long_stream = engine.generate(long_request())
    await first_delta(long_stream)  # the long one is running
    long_done = asyncio.ensure_future(collect_rest(long_stream))

    short = await collect(engine, short_request())

    assert (short.finish_reason, short.completion_tokens) == ("length", 3)
    assert not long_done.done(), "the short request finished only after the long one"
    long_result = await long_done
    assert long_result.completion_tokens == 400


async def collect_rest(stream):
    async for output in stream:
        if output.result is not None:
            return output.result


@pytest.mark.asyncio
async def test_abort_stops_a_running_request_and_spares_the_others(make_engine):
    engine = await make_engine()
    other = asyncio.ensure_future(collect(engine, long_request("other", max_tokens=30)))
    stream = engine.generate(long_request("victim"))
    await first_delta(stream)

    await engine.abort("victim")
    result = await collect_rest(stream)

    assert result.finish_reason == "abort"
    assert 0 < result.completion_tokens < 400
    assert (await other).completion_tokens == 30


@pytest.mark.asyncio
async def test_leaving_the_stream_early_frees_the_slot(make_engine):
    engine = await make_engine(batch_max_size=1)
    stream = engine.generate(long_request("abandoned"))
    await first_delta(stream)
    await stream.aclose()  # the caller went away (e.g. its task was cancelled)

    # With one slot, the next request can only run if the abandoned one left it.
    result = await asyncio.wait_for(collect(engine, short_request()), timeout=60)
    assert result.finish_reason == "length"


@pytest.mark.asyncio
async def test_never_more_running_than_the_batch_limit(make_engine):
    engine = await make_engine(batch_max_size=2)
    tasks = [asyncio.ensure_future(collect(engine, long_request(str(i), max_tokens=20))) for i in range(5)]
    most = 0
    while not all(task.done() for task in tasks):
        most = max(most, engine.running)
        await asyncio.sleep(0.002)
    results = [task.result() for task in tasks]
    assert [r.completion_tokens for r in results] == [20] * 5
    assert most == 2
