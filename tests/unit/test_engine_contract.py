"""What every engine promises the worker (workers/engines/base.py), written once
and run on each engine that can run here: echo (a token delay stands in for
decoding), torch on the tiny model, and vLLM's CPU build on the tiny model
where it is installed (`make install-vllm` makes .venv-vllm; CI runs this
module there too: `.venv-vllm/bin/python -m pytest tests/unit/test_engine_contract.py`).

One engine of each kind serves the whole module (two slots, the tiny model's
adapters), as one worker serves request after request: every test also
checks that it leaves nothing running behind. Echo has no model, so the
promises about a model's context, its adapters and its greedy text are run on
the model engines only.
"""

from __future__ import annotations

import asyncio
import importlib.util

import pytest
import pytest_asyncio
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from shared.schema import ChatMessage, Params
from workers.engines import load_engine
from workers.engines.base import GenerationRequest, collect
from workers.settings import WorkerSettings

pytestmark = pytest.mark.asyncio(loop_scope="module")

# The same index for an engine in both lists, so pytest runs each engine's tests together
# and starts each engine once (vLLM takes ~35 s).
MODEL_ENGINES = (["vllm"] if importlib.util.find_spec("vllm") else []) + ["torch"]
ENGINES = MODEL_ENGINES + ["echo"]
model_engines_only = pytest.mark.parametrize("engine", MODEL_ENGINES, indirect=True)
torch_only = pytest.mark.parametrize("engine", ["torch"], indirect=True)

LONG_PROMPT = " ".join(f"w{i}" for i in range(400))  # echo: 400 tokens to give back
PROMPT = "The weather this morning was cold and clear, and the wind"


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=ENGINES)
async def engine(request, tiny_model_dir, adapters_dir):
    kind = request.param
    settings = {"echo": dict(echo_token_delay_ms=5),
                "torch": dict(model=str(tiny_model_dir), device="cpu", adapters_dir=str(adapters_dir)),
                "vllm": dict(model=str(tiny_model_dir), adapters_dir=str(adapters_dir))}[kind]
    engine = load_engine(WorkerSettings(engine=kind, batch_max_size=2, max_adapters=2, **settings))
    await engine.start()
    yield engine
    await engine.close()


@pytest_asyncio.fixture(autouse=True, loop_scope="module")
async def nothing_left_running(engine):
    yield
    for _ in range(200):
        if engine.running == 0:
            return
        await asyncio.sleep(0.05)
    pytest.fail(f"the test left {engine.running} requests running")


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """transformers on the same checkpoint: what greedy text must be."""
    return (AutoTokenizer.from_pretrained(tiny_model_dir),
            AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval())


def greedy_directly(model, tokenizer, input_ids: list[int], n: int) -> str:
    ids = torch.tensor([input_ids])
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def request(rid: str, prompt: str | None = PROMPT, *, messages=None, adapter=None, priority=0,
            **params) -> GenerationRequest:
    params.setdefault("temperature", 0)
    return GenerationRequest(rid, Params(**params), prompt=None if messages else prompt, messages=messages,
                             adapter=adapter, priority=priority)


def long_request(rid="long", max_tokens=400) -> GenerationRequest:
    return request(rid, LONG_PROMPT, max_tokens=max_tokens)


def short_request(rid="short", max_tokens=3, priority=0) -> GenerationRequest:
    return request(rid, "a b c d e f", max_tokens=max_tokens, priority=priority)


async def first_delta(stream) -> None:
    async for output in stream:
        if output.completion_tokens:
            return


async def collect_rest(stream):
    async for output in stream:
        if output.result is not None:
            return output.result


async def running_in_background(engine, rid: str) -> asyncio.Future:
    """A long request, once it has its first token, read to its end in the background."""
    stream = engine.generate(long_request(rid))
    await first_delta(stream)
    return asyncio.ensure_future(collect_rest(stream))


# ---- streaming and scheduling ----------------------------------------------------


async def test_deltas_add_up_to_the_final_text(engine):
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
    assert result.first_token_at <= result.finished_at


async def test_a_short_request_does_not_wait_for_a_long_one(engine):
    long_done = await running_in_background(engine, "long")

    short = await collect(engine, short_request())

    assert (short.finish_reason, short.completion_tokens) == ("length", 3)
    assert not long_done.done(), "the short request finished only after the long one"
    assert (await long_done).completion_tokens == 400


async def test_abort_stops_a_running_request_and_spares_the_others(engine):
    other = asyncio.ensure_future(collect(engine, long_request("other", max_tokens=30)))
    stream = engine.generate(long_request("victim"))
    await first_delta(stream)

    await engine.abort("victim")
    result = await collect_rest(stream)

    assert result.finish_reason == "abort"
    assert 0 < result.completion_tokens < 400
    assert (await other).completion_tokens == 30


async def test_leaving_the_stream_early_frees_the_slot(engine):
    kept = await running_in_background(engine, "kept")
    stream = engine.generate(long_request("abandoned"))
    await first_delta(stream)  # both slots are taken now
    await stream.aclose()  # the caller went away (e.g. its task was cancelled)

    # The next request can only run before "kept" ends if the abandoned one left its slot.
    result = await asyncio.wait_for(collect(engine, short_request()), timeout=60)
    assert result.finish_reason == "length"
    assert not kept.done(), "the short request waited for a slot the abandoned request kept"
    await engine.abort("kept")
    await kept


async def test_never_more_running_than_the_batch_limit(engine):
    tasks = [asyncio.ensure_future(collect(engine, long_request(str(i), max_tokens=20))) for i in range(5)]
    most = 0
    while not all(task.done() for task in tasks):
        most = max(most, engine.running)
        await asyncio.sleep(0.002)
    assert [task.result().completion_tokens for task in tasks] == [20] * 5
    assert most == 2


async def test_a_higher_priority_request_takes_the_next_free_slot(engine):
    blockers = [await running_in_background(engine, f"blocker{i}") for i in range(2)]
    low = asyncio.ensure_future(collect(engine, short_request("low", priority=10)))
    await asyncio.sleep(0.3)  # "low" waits first
    high = asyncio.ensure_future(collect(engine, short_request("high", priority=-10)))
    await asyncio.sleep(0.3)

    await engine.abort("blocker0")  # one slot frees
    low_result, high_result = await low, await high

    assert high_result.first_token_at < low_result.first_token_at, "the lower-priority request ran first"
    await engine.abort("blocker1")
    assert [(await b).finish_reason for b in blockers] == ["abort", "abort"]


# ---- what a request asks for --------------------------------------------------------


async def test_a_stop_string_cuts_the_text_before_it(engine):
    full = await collect(engine, request("full", LONG_PROMPT, max_tokens=40))
    stop = full.text[len(full.text) // 2:][:4]
    assert stop.strip(), f"pick another slice of {full.text!r}"

    result = await collect(engine, request("stopped", LONG_PROMPT, max_tokens=40, stop=["never \x00", stop]))

    assert result.finish_reason == "stop"
    assert result.text == full.text[:full.text.find(stop)]
    assert result.completion_tokens < full.completion_tokens


async def test_a_seed_gives_the_same_text_whatever_the_batch_mates(engine):
    sampled = dict(max_tokens=30, temperature=1.0, top_p=0.95, seed=1234)
    alone = await collect(engine, request("alone", LONG_PROMPT, **sampled))
    with_mates = await asyncio.gather(collect(engine, request("mate", max_tokens=20, temperature=1.5)),
                                      collect(engine, request("seeded", LONG_PROMPT, **sampled)))
    assert alone.completion_tokens == 30
    assert with_mates[1].text == alone.text


@model_engines_only
async def test_another_seed_samples_another_text(engine):
    texts = {(await collect(engine, request(str(seed), max_tokens=30, temperature=1.0, seed=seed))).text
             for seed in (1, 2)}
    greedy = (await collect(engine, request("greedy", max_tokens=30))).text
    assert len(texts | {greedy}) == 3


async def test_a_conversation_is_answered_as_a_whole(engine):
    question = ChatMessage(role="user", content="What is a queue?")
    alone = await collect(engine, request("alone", messages=[question], max_tokens=8))
    both = await collect(engine, request("both", messages=[ChatMessage(role="system", content="Be terse."), question],
                                         max_tokens=8))
    assert alone.error is None and both.error is None
    assert both.prompt_tokens > alone.prompt_tokens
    assert both.completion_tokens == 8 or both.finish_reason == "stop"


# ---- the model: greedy text, chat template, context, adapters ------------------------


@model_engines_only
async def test_greedy_text_is_what_transformers_generates(engine, reference):
    tokenizer, model = reference
    result = await collect(engine, request("r", max_tokens=24))
    assert result.text == greedy_directly(model, tokenizer, tokenizer(PROMPT).input_ids, 24)
    assert result.prompt_tokens == len(tokenizer(PROMPT).input_ids)


@model_engines_only
async def test_a_conversation_is_rendered_by_the_chat_template(engine, reference):
    tokenizer, model = reference
    messages = [ChatMessage(role="system", content="You are terse."), ChatMessage(role="user", content="Hi?")]
    rendered = tokenizer.apply_chat_template([m.model_dump() for m in messages], add_generation_prompt=True,
                                             tokenize=False)
    ids = tokenizer(rendered, add_special_tokens=False).input_ids  # the template writes its own BOS

    result = await collect(engine, request("chat", messages=messages, max_tokens=16))

    assert result.prompt_tokens == len(ids)
    assert result.text == greedy_directly(model, tokenizer, ids, 16)


@model_engines_only
async def test_a_request_that_does_not_fit_the_context_fails_alone(engine, reference):
    tokenizer, _ = reference
    too_long = "word " * 3000
    # " queue" is one token: BOS + 2040 of them leave room for 7 more in the 2,048-token context.
    nearly_full = " queue" * 2040
    assert len(tokenizer(nearly_full).input_ids) == 2041

    results = await asyncio.gather(
        collect(engine, request("too-long", too_long, max_tokens=8)),
        collect(engine, request("fits", nearly_full, max_tokens=7)),
        collect(engine, request("one-over", nearly_full, max_tokens=8)),
        collect(engine, request("ok", max_tokens=8)),
    )

    too_long, fits, one_over, ok = results
    assert too_long.finish_reason == "error" and "context of 2048 tokens" in too_long.error
    assert (too_long.text, too_long.completion_tokens) == ("", 0)
    assert fits.error is None and fits.completion_tokens == 7
    assert one_over.finish_reason == "error" and "shorten the prompt or lower max_tokens" in one_over.error
    assert ok.error is None and ok.completion_tokens == 8


@model_engines_only
async def test_adapters_are_served_by_name_beside_the_base_model(engine, reference, tiny_model_dir,
                                                                 adapters_dir):
    tokenizer, model = reference
    ids = tokenizer(PROMPT).input_ids
    expected = {None: greedy_directly(model, tokenizer, ids, 24)}
    for name in ("style-a", "style-b"):
        expected[name] = peft_greedy(tiny_model_dir, adapters_dir / name, tokenizer, ids)
    assert len(set(expected.values())) == 3, "the adapters should change the text"

    names = [None, "style-a", "style-b", None, "style-b"]
    results = await asyncio.gather(*(collect(engine, request(str(i), adapter=name, max_tokens=24))
                                     for i, name in enumerate(names)))

    assert [r.text for r in results] == [expected[name] for name in names]


def peft_greedy(model_dir, adapter_dir, tokenizer, ids: list[int], n: int = 24) -> str:
    """peft's own greedy text for one adapter: PeftModel.from_pretrained, then generate."""
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return greedy_directly(PeftModel.from_pretrained(base, adapter_dir).eval(), tokenizer, ids, n)


@torch_only
async def test_ia3_adapters_are_served_by_name_beside_lora_and_base_rows(engine, reference, tiny_model_dir,
                                                                         adapters_dir):
    tokenizer, model = reference
    ids = tokenizer(PROMPT).input_ids
    expected = {None: greedy_directly(model, tokenizer, ids, 24)}
    for name in ("tone-a", "tone-b", "style-a"):
        expected[name] = peft_greedy(tiny_model_dir, adapters_dir / name, tokenizer, ids)
    assert len(set(expected.values())) == 4, "the adapters should change the text"

    names = ["tone-a", None, "style-a", "tone-b", "tone-a", None]
    results = await asyncio.gather(*(collect(engine, request(str(i), adapter=name, max_tokens=24))
                                     for i, name in enumerate(names)))

    assert [r.text for r in results] == [expected[name] for name in names]


@model_engines_only
@pytest.mark.parametrize("name, reason", [("missing", "unknown adapter 'missing'"),
                                          ("prompt-tuned", "adapter 'prompt-tuned' is a peft PROMPT_TUNING "
                                                           "adapter; the"),
                                          ("../style-a", "invalid adapter name"),
                                          ("__base__", "invalid adapter name")])
async def test_an_adapter_that_cannot_be_served_is_that_requests_error(engine, name, reason):
    bad, good = await asyncio.gather(collect(engine, request("bad", adapter=name, max_tokens=4)),
                                     collect(engine, request("good", max_tokens=4)))
    assert bad.finish_reason == "error" and reason in bad.error
    assert good.error is None and good.completion_tokens == 4
