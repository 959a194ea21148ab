"""A full fine-tune served by a worker started on it: LLMQ_MODEL names the model by
the name its job published it under ("tiny-llama:ft-<suffix>-<8 hex>"), the worker
loads {LLMQ_REGISTRY_DIR}/models/<the part after the colon>, and serves it under
that name. A name the registry has no full model of stops the start with a clear error."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from shared.keys import Keys
from shared.schema import Params
from shared.store.fine_tuning import TrainingStore
from shared.training import REGISTRY_METADATA, registry_path
from workers.engines.base import EngineError, GenerationRequest, collect
from workers.engines.torch.engine import TorchEngine
from workers.settings import WorkerSettings

SERVED = "tiny-llama:ft-x-0a1b2c3d"
PROMPT = "The weather this morning was cold and clear, and the wind"


@pytest.fixture(scope="module")
def registry(tiny_model_dir, tmp_path_factory):
    """A registry holding one full fine-tune of the tiny model: its weights moved, so its
    text is not the base model's, saved whole with its tokenizer, as the trainer publishes it."""
    root = tmp_path_factory.mktemp("registry")
    folder = registry_path(root, "full", "ft-x-0a1b2c3d")
    torch.manual_seed(7)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(folder)
    (folder / REGISTRY_METADATA).write_text(json.dumps({"method": "full", "base_model": "tiny-llama"}))
    return root


def greedy(model_dir, n: int = 16) -> str:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([tokenizer(PROMPT).input_ids])
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_a_fine_tuned_name_resolves_to_its_registry_folder(registry, tmp_path):
    settings = WorkerSettings(engine="torch", model=SERVED, registry_dir=registry)
    assert settings.model_path == str(registry / "models" / "ft-x-0a1b2c3d")
    assert settings.served_model_name == SERVED
    # A model path or hub name is what it was; so is a folder that happens to have such a name.
    assert WorkerSettings(model="/models/tiny-llama", registry_dir=registry).model_path == "/models/tiny-llama"
    (tmp_path / SERVED).mkdir()
    local = WorkerSettings(model=str(tmp_path / SERVED), registry_dir=registry)
    assert (local.model_path, local.served_model_name) == (str(tmp_path / SERVED), SERVED)


async def test_a_worker_started_on_a_full_fine_tune_serves_it_under_its_name(registry, tiny_model_dir):
    engine = TorchEngine(WorkerSettings(engine="torch", model=SERVED, registry_dir=registry, device="cpu"))
    await engine.start()
    try:
        result = await collect(engine, GenerationRequest("r", Params(max_tokens=16, temperature=0), prompt=PROMPT))
    finally:
        await engine.close()
    assert engine.model_name == SERVED
    expected = greedy(registry / "models" / "ft-x-0a1b2c3d")
    assert expected != greedy(tiny_model_dir), "the fine-tune should change the text"
    assert result.text == expected


async def test_a_fine_tuned_name_the_registry_has_no_full_model_of_stops_the_start(registry):
    adapter = registry / "adapters" / "ft-lora-11223344"
    adapter.mkdir(parents=True)
    for name, hint in (("tiny-llama:ft-gone-55667788", ""),
                       ("tiny-llama:ft-lora-11223344",
                        f"; it is an adapter: serve it from a worker on 'tiny-llama' with "
                        f"LLMQ_ADAPTERS_DIR={str(registry / 'adapters')!r}")):
        output = name.partition(":")[2]
        engine = TorchEngine(WorkerSettings(engine="torch", model=name, registry_dir=registry, device="cpu"))
        with pytest.raises(EngineError) as refused:
            await engine.start()
        assert str(refused.value) == (
            f"LLMQ_MODEL {name!r} names a fine-tuned model, but the registry (LLMQ_REGISTRY_DIR="
            f"{str(registry)!r}) has no full model {output!r} at {str(registry / 'models' / output)!r}{hint}")


async def test_a_request_naming_the_fine_tune_runs_on_its_worker(gateway, start_worker, registry):
    import openai

    await start_worker(engine="torch", model=SERVED, registry_dir=registry, device="cpu")
    # What the trainer does when the job succeeds (tests/integration/test_fine_tuning.py runs one):
    # the gateway routes a fine-tuned name only once it is published for the caller.
    store = TrainingStore(gateway.redis, Keys.of(gateway.settings), gateway.settings.training_ttl_seconds)
    await store.publish(SERVED, {"tenant": None, "base": "tiny-llama", "method": "full", "output": "ft-x-0a1b2c3d",
                                 "job": "ftjob-" + "0" * 16 + "0a1b2c3d", "created_at": 0})
    client = openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key="unused: auth is off here", max_retries=0)
    try:
        listed = [m.id async for m in client.models.list()]
        answer = await client.completions.create(model=SERVED, prompt=PROMPT, max_tokens=16, temperature=0)
    finally:
        await client.close()
    assert SERVED in listed
    assert answer.model == SERVED and answer.choices[0].text == greedy(registry / "models" / "ft-x-0a1b2c3d")
