"""The torch engine on the tiny local model, beyond what every engine promises
(test_engine_contract.py): same text as `model.generate` in padded and changing
batches, repeatable seeds and filters, length/EOS/error finishes. The model is
built once per module (a few seconds on CPU)."""

from __future__ import annotations

import asyncio
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from shared.schema import ChatMessage, Params
from workers import tinymodel
from workers.engines.base import EngineError, GenerationRequest, collect
from workers.engines.torch.engine import TorchEngine
from workers.settings import WorkerSettings

PROMPTS = [
    "A queue is",
    "The weather this morning was cold and clear, and the wind",
    "Hi",
    "To make a simple bread, you need flour, water, salt and yeast. Mix the yeast with warm water and",
]


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir


@pytest.fixture(scope="module")
def engine(model_dir):
    # Started on its own loop: the engine keeps no loop-bound state between
    # calls, and a sync module fixture loads the model once for all tests.
    engine = TorchEngine(WorkerSettings(engine="torch", model=str(model_dir), device="cpu", dtype="auto"))
    asyncio.run(engine.start())
    yield engine
    asyncio.run(engine.close())


@pytest.fixture(scope="module")
def reference(model_dir):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return tokenizer, model


def request(prompt=None, *, rid="r", messages=None, adapter=None, **params) -> GenerationRequest:
    return GenerationRequest(rid, Params(**params), prompt=prompt, messages=messages, adapter=adapter)


def greedy(prompt, rid="r", max_tokens=32, **params):
    return request(prompt, rid=rid, max_tokens=max_tokens, temperature=0, **params)


async def run_one(engine, req):
    return await collect(engine, req)


async def run_batch(engine, reqs):
    """Submitted together: they share the running batch (joining it step by step)."""
    return await asyncio.gather(*(collect(engine, req) for req in reqs))


def generate_directly(reference, input_ids: list[int], n: int) -> tuple[str, list[int]]:
    tokenizer, model = reference
    ids = torch.tensor([input_ids])
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
    new = out[0, ids.shape[1]:].tolist()
    return tokenizer.decode(new, skip_special_tokens=True), new


# ---- (a) the correctness promise ----------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("prompt", PROMPTS)
async def test_greedy_text_equals_model_generate(engine, reference, prompt):
    tokenizer, model = reference
    enc = tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=40, do_sample=False)
    expected_ids = out[0, enc.input_ids.shape[1]:]
    expected = tokenizer.decode(expected_ids, skip_special_tokens=True)

    result = await run_one(engine, greedy(prompt, max_tokens=40))

    assert result.error is None
    assert result.text == expected
    assert result.prompt_tokens == enc.input_ids.shape[1]
    assert result.completion_tokens == len(expected_ids)
    assert len(set(expected_ids.tolist())) > 10, "the tiny model should not repeat one token"


# ---- (b) batching changes nothing per row -------------------------------------


@pytest.mark.asyncio
async def test_padded_batch_gives_each_row_its_solo_text(engine):
    # Prompts of 2..25 tokens, so the short ones sit behind a lot of left padding.
    alone = [await run_one(engine, greedy(p, max_tokens=48)) for p in PROMPTS]
    batch = await run_batch(engine, [greedy(p, rid=str(i), max_tokens=48) for i, p in enumerate(PROMPTS)])

    assert [r.request_id for r in batch] == [str(i) for i in range(len(PROMPTS))]
    assert [r.text for r in batch] == [r.text for r in alone]
    assert [r.completion_tokens for r in batch] == [r.completion_tokens for r in alone]
    assert [r.prompt_tokens for r in batch] == [r.prompt_tokens for r in alone]


@pytest.mark.asyncio
async def test_rows_joining_and_leaving_a_running_batch_keep_their_solo_text(engine):
    # Each request arrives once the one before has its first token, so it
    # joins a running batch; longer prompts join narrower batches, short
    # requests leave while long ones run on (the last rows move into their
    # places), and 100 tokens outgrow the cache's first allocation.
    plan = [(PROMPTS[2], 100), (PROMPTS[3], 6), (PROMPTS[0], 60), (PROMPTS[1], 3), (PROMPTS[3], 80),
            (PROMPTS[2], 9), (PROMPTS[1], 45)]
    alone = [await run_one(engine, greedy(p, max_tokens=n)) for p, n in plan]

    async def arrive(i, started):
        if i:
            await started[i - 1].wait()
        async for output in engine.generate(greedy(plan[i][0], rid=str(i), max_tokens=plan[i][1])):
            started[i].set()
            if output.result is not None:
                return output.result

    started = [asyncio.Event() for _ in plan]
    together = await asyncio.gather(*(arrive(i, started) for i in range(len(plan))))

    assert [r.text for r in together] == [r.text for r in alone]
    assert [r.completion_tokens for r in together] == [n for _, n in plan]


@pytest.mark.asyncio
async def test_rows_with_different_max_tokens_finish_on_their_own(engine):
    batch = await run_batch(engine, [greedy(PROMPTS[0], rid="short", max_tokens=3),
                                   greedy(PROMPTS[1], rid="long", max_tokens=30)])
    assert [(r.finish_reason, r.completion_tokens) for r in batch] == [("length", 3), ("length", 30)]
    # The short row's text is its own first 3 tokens, not cut from a longer run.
    assert batch[0].text == (await run_one(engine, greedy(PROMPTS[0], max_tokens=3))).text


# ---- (c) sampling ---------------------------------------------------------------


@pytest.mark.asyncio
async def test_same_seed_same_text_whatever_the_batch_mates(engine):
    sampled = dict(max_tokens=40, temperature=1.0, seed=1234)
    alone = await run_one(engine, request(PROMPTS[0], **sampled))
    again = await run_one(engine, request(PROMPTS[0], **sampled))
    in_batch = await run_batch(engine, [
        request(PROMPTS[3], rid="mate1", max_tokens=20, temperature=0.7, seed=1),
        request(PROMPTS[0], rid="seeded", **sampled),
        greedy(PROMPTS[1], rid="mate2", max_tokens=50),
        request(PROMPTS[2], rid="mate3", max_tokens=5, temperature=1.5),  # unseeded
    ])
    assert alone.text == again.text == in_batch[1].text
    other_seed = await run_one(engine, request(PROMPTS[0], **{**sampled, "seed": 4321}))
    assert other_seed.text != alone.text
    greedy_text = (await run_one(engine, greedy(PROMPTS[0], max_tokens=40))).text
    assert alone.text != greedy_text


@pytest.mark.asyncio
async def test_filters_that_leave_one_token_are_greedy(engine):
    expected = (await run_one(engine, greedy(PROMPTS[1], max_tokens=24))).text
    top_k_1 = await run_one(engine, request(PROMPTS[1], max_tokens=24, temperature=2.0, top_k=1))
    tiny_top_p = await run_one(engine, request(PROMPTS[1], max_tokens=24, temperature=0.5, top_p=1e-6))
    assert top_k_1.text == expected
    assert tiny_top_p.text == expected


@pytest.mark.asyncio
async def test_top_k_and_top_p_runs_are_repeatable(engine):
    params = dict(max_tokens=30, temperature=1.2, top_k=50, top_p=0.9, seed=99)
    first = await run_one(engine, request(PROMPTS[2], **params))
    second = (await run_batch(engine, [greedy(PROMPTS[3]), request(PROMPTS[2], rid="x", **params)]))[1]
    assert first.text == second.text
    assert first.completion_tokens == 30 or first.finish_reason == "stop"


# ---- (d) finishing ----------------------------------------------------------------


@pytest.mark.asyncio
async def test_max_tokens_finishes_with_length(engine):
    result = await run_one(engine, greedy(PROMPTS[1], max_tokens=7))
    assert result.finish_reason == "length"
    assert result.completion_tokens == 7
    sampled = await run_one(engine, request(PROMPTS[1], max_tokens=9, temperature=1.0, seed=3))
    assert (sampled.finish_reason, sampled.completion_tokens) == ("length", 9)


@pytest.mark.asyncio
async def test_eos_finishes_with_stop(engine, reference):
    tokenizer, _ = reference
    eos = tokenizer.eos_token_id
    assert (await run_one(engine, greedy(PROMPTS[0], max_tokens=5))).finish_reason == "length"

    # The untrained model never picks EOS by itself: make its lm_head prefer it.
    def prefer_eos(_module, _inputs, output):
        output[..., eos] = output.max() + 10
        return output

    handle = engine.model.lm_head.register_forward_hook(prefer_eos)
    try:
        result = await run_one(engine, greedy(PROMPTS[0], max_tokens=5))
    finally:
        handle.remove()
    assert (result.finish_reason, result.completion_tokens, result.text) == ("stop", 1, "")


# ---- (e) prompts that do not fit ----------------------------------------------------


@pytest.mark.asyncio
async def test_too_long_prompt_fails_alone_and_its_batch_mate_runs(engine, reference):
    tokenizer, _ = reference
    long_prompt = "word " * 3000
    n_tokens = len(tokenizer(long_prompt).input_ids)
    assert n_tokens > engine.context

    results = await run_batch(engine, [greedy(long_prompt, rid="long", max_tokens=8),
                                     greedy(PROMPTS[0], rid="ok", max_tokens=8)])

    failed, ok = results
    assert failed.request_id == "long" and failed.finish_reason == "error"
    assert f"the prompt is {n_tokens} tokens" in failed.error
    assert f"context of {engine.context} tokens" in failed.error
    assert failed.text == "" and failed.completion_tokens == 0
    assert ok.error is None and ok.completion_tokens == 8


@pytest.mark.asyncio
async def test_prompt_plus_max_tokens_must_fit_the_context(engine, reference):
    tokenizer, _ = reference
    # " queue" is one token, so this prompt is BOS + 2040 tokens: room for 7 more.
    prompt = " queue" * 2040
    n_tokens = len(tokenizer(prompt).input_ids)
    room = engine.context - n_tokens
    assert room == 7

    fits = await run_one(engine, greedy(prompt, max_tokens=room))
    one_over = await run_one(engine, greedy(prompt, max_tokens=room + 1))
    huge = await run_one(engine, greedy("Hi", max_tokens=engine.context))

    assert fits.error is None and fits.completion_tokens == room
    assert one_over.finish_reason == "error" and "shorten the prompt or lower max_tokens" in one_over.error
    assert huge.finish_reason == "error" and "max_tokens" in huge.error


@pytest.mark.asyncio
async def test_adapter_requests_fail_clearly(engine):
    result = await run_one(engine, greedy("Hi", adapter="my-lora"))
    assert result.finish_reason == "error" and "adapter" in result.error


# ---- (f) chat input ----------------------------------------------------------------


@pytest.mark.asyncio
async def test_messages_without_a_chat_template_join_role_lines(engine, reference, monkeypatch):
    tokenizer, _ = reference
    monkeypatch.setattr(engine.tokenizer, "chat_template", None)
    messages = [ChatMessage(role="user", content="Hello there")]
    result = await run_one(engine, request(messages=messages, max_tokens=10, temperature=0))
    expected_ids = tokenizer("user: Hello there\nassistant:").input_ids
    assert result.prompt_tokens == len(expected_ids)
    assert result.text == generate_directly(reference, expected_ids, 10)[0]


# ---- (g) the tiny model and loading -------------------------------------------------


def test_tiny_model_dir_loads_with_from_pretrained(model_dir, reference):
    for name in ("config.json", "generation_config.json", "model.safetensors",
                 "tokenizer.json", "tokenizer_config.json"):
        assert (model_dir / name).is_file(), name
    tokenizer, model = reference
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token) == (
        "<s>", "</s>", "<pad>", "<unk>")
    assert tokenizer.chat_template
    assert len(tokenizer) == model.config.vocab_size
    assert model.config.model_type == "llama"
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    # A real BPE tokenizer: common words are single tokens, any text round-trips.
    assert len(tokenizer(" queue").input_ids) == 2  # BOS + one token
    text = "Any text, even ünïcode ☃ and\ttabs, round-trips."
    assert tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True) == text


def test_build_is_skipped_when_the_model_is_there(model_dir, monkeypatch):
    def fail():
        raise AssertionError("rebuilt a model that was already there")

    monkeypatch.setattr(tinymodel, "_train_tokenizer", fail)
    assert tinymodel.build_tiny_model(model_dir) == model_dir


def test_forced_build_replaces_the_model_with_identical_bytes(model_dir, tmp_path):
    copy = tmp_path / "tiny-llama"
    shutil.copytree(model_dir, copy)
    (copy / "model.safetensors").write_bytes(b"corrupt")

    tinymodel.build_tiny_model(copy, force=True)

    # Deterministic: the same seed and corpus build the same weights and vocabulary.
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (copy / name).read_bytes() == (model_dir / name).read_bytes(), name
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-llama"]  # no temp dirs left behind


@pytest.mark.asyncio
async def test_missing_model_path_says_how_to_build_it(tmp_path):
    missing = tmp_path / "nope"
    engine = TorchEngine(WorkerSettings(engine="torch", model=str(missing), device="cpu"))
    with pytest.raises(EngineError, match=r"python -m workers\.tinymodel"):
        await engine.start()


@pytest.mark.asyncio
async def test_generate_before_start_is_an_engine_error(model_dir):
    engine = TorchEngine(WorkerSettings(engine="torch", model=str(model_dir)))
    assert engine.model_name == "tiny-llama"
    with pytest.raises(EngineError):
        await run_one(engine, greedy("Hi"))
