"""LoRA adapters in the torch engine: adapters made here with peft on the tiny
model (weights perturbed so their text differs), saved with `save_pretrained`,
served beside base-model requests in the same running batch."""

from __future__ import annotations

import asyncio

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from shared.schema import Params
from workers.engines.base import GenerationRequest, collect
from workers.engines.torch.engine import TorchEngine
from workers.settings import WorkerSettings

PROMPT = "The weather this morning was cold and clear, and the wind"


def base_model(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def adapters_dir(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    for seed, name in ((1, "style-a"), (2, "style-b")):
        torch.manual_seed(seed)
        # init_lora_weights=False: B starts random, not zero, so the adapter changes the output.
        config = LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False)
        get_peft_model(base_model(tiny_model_dir), config).save_pretrained(root / name)
    return root


def greedy_directly(model, tokenizer, n=24) -> str:
    enc = tokenizer(PROMPT, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=n, do_sample=False)
    return tokenizer.decode(out[0, enc.input_ids.shape[1]:], skip_special_tokens=True)


def request(rid, adapter=None) -> GenerationRequest:
    return GenerationRequest(rid, Params(max_tokens=24, temperature=0), prompt=PROMPT, adapter=adapter)


async def test_adapters_and_base_in_one_batch_match_peft_directly(tiny_model_dir, adapters_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    expected = {"base": greedy_directly(base_model(tiny_model_dir), tokenizer)}
    for name in ("style-a", "style-b"):
        peft_model = PeftModel.from_pretrained(base_model(tiny_model_dir), adapters_dir / name).eval()
        expected[name] = greedy_directly(peft_model, tokenizer)
    assert len(set(expected.values())) == 3, "the adapters should change the text"

    engine = TorchEngine(WorkerSettings(engine="torch", model=str(tiny_model_dir), device="cpu",
                                  adapters_dir=str(adapters_dir), max_adapters=2))
    await engine.start()
    try:
        results = await asyncio.gather(collect(engine, request("base")), collect(engine, request("a", "style-a")),
                                       collect(engine, request("b", "style-b")), collect(engine, request("base2")))
    finally:
        await engine.close()
    texts = [r.text for r in results]
    assert texts == [expected["base"], expected["style-a"], expected["style-b"], expected["base"]]


async def test_more_adapters_than_slots_take_turns(tiny_model_dir, adapters_dir):
    engine = TorchEngine(WorkerSettings(engine="torch", model=str(tiny_model_dir), device="cpu",
                                  adapters_dir=str(adapters_dir), max_adapters=1))
    await engine.start()
    try:
        alone = {name: (await collect(engine, request(name, name))).text for name in ("style-a", "style-b")}
        together = await asyncio.gather(*(collect(engine, request(f"{name}-{i}", name))
                                          for i in range(3) for name in ("style-a", "style-b")))
    finally:
        await engine.close()
    assert [r.text for r in together] == [alone["style-a"], alone["style-b"]] * 3
    assert list(engine.adapters.loaded) == ["style-b"] or list(engine.adapters.loaded) == ["style-a"]


@pytest.mark.parametrize("name, reason", [("missing", "unknown adapter 'missing'"),
                                          ("../style-a", "invalid adapter name"),
                                          ("__base__", "invalid adapter name")])
async def test_unknown_or_unsafe_adapter_is_a_per_request_error(tiny_model_dir, adapters_dir, name, reason):
    engine = TorchEngine(WorkerSettings(engine="torch", model=str(tiny_model_dir), device="cpu",
                                  adapters_dir=str(adapters_dir)))
    await engine.start()
    try:
        bad, good = await asyncio.gather(collect(engine, request("bad", name)), collect(engine, request("good")))
    finally:
        await engine.close()
    assert bad.finish_reason == "error" and reason in bad.error
    assert good.error is None and good.completion_tokens == 24


async def test_no_adapters_dir_refuses_adapter_requests(tiny_model_dir):
    engine = TorchEngine(WorkerSettings(engine="torch", model=str(tiny_model_dir), device="cpu"))
    await engine.start()
    try:
        result = await collect(engine, request("x", "style-a"))
    finally:
        await engine.close()
    assert result.finish_reason == "error" and "LLMQ_ADAPTERS_DIR is not set" in result.error
