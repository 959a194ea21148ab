"""The quantization strategies on the tiny model: each variant saved as a registry folder
(artifact.save) and served from it by the real torch engine (LLMQ_MODEL=<folder>), as a
worker serves an optimized model; quantized folders are smaller on disk than the original,
and what can't be served quantized is refused with words that say why."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from shared.optimization import Qat, Recovery, WeightOnly
from shared.schema import Params
from shared.training import REGISTRY_METADATA, parse_example
from workers.engines.base import EngineError, GenerationRequest, collect
from workers.engines.torch.engine import TorchEngine
from workers.engines.torch.model_runner import ModelRunner
from workers.optimize import artifact, quantization
from workers.optimize.strategies import Optimized, StrategyError
from workers.optimize.tune import fine_tune
from workers.settings import WorkerSettings
from workers.training import finsent
from workers.training.data import tokenize

PROMPT = "The weather this morning was cold and clear, and the wind"
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
def model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def size_on_disk(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


async def serve(folder: Path, **settings):
    """A greedy request to the torch engine serving `folder`, and the engine's model (to look at)."""
    engine = TorchEngine(WorkerSettings(engine="torch", model=str(folder), device="cpu", **settings))
    await engine.start()
    try:
        request = GenerationRequest("q", Params(max_tokens=MAX_TOKENS, temperature=0), prompt=PROMPT)
        return await collect(engine, request), engine.runner.model
    finally:
        await engine.close()


def assert_served(result) -> None:
    """Text of the asked length, or an end of text the model chose (it says "stop")."""
    assert result.error is None
    assert result.finish_reason in ("length", "stop")
    if result.finish_reason == "length":
        assert result.completion_tokens == MAX_TOKENS
    else:
        assert 0 < result.completion_tokens < MAX_TOKENS
    assert result.text


def save(optimized: Optimized, tokenizer, tmp_path: Path, name: str) -> Path:
    folder = artifact.save(optimized, tokenizer, tmp_path / name,
                           {"model": f"tiny-llama:opt-{name}-0a1b2c3d", "method": "optimization"})
    meta = json.loads((folder / REGISTRY_METADATA).read_text())
    assert meta["serving"] == optimized.serving and meta["method"] == "optimization"
    assert artifact.serving_of(folder) == optimized.serving
    return folder


async def test_int8_dynamic_is_smaller_and_served_quantized(model, tokenizer, tiny_model_dir, tmp_path):
    linears = sum(isinstance(m, torch.nn.Linear) for m in model.modules())  # 7 a layer, and the head
    optimized = quantization.int8_dynamic(model)
    assert optimized.serving == {"format": "int8_dynamic", "dtype": "float32"}
    assert optimized.figures["quantized_linears"] == linears == 7 * model.config.num_hidden_layers + 1
    folder = save(optimized, tokenizer, tmp_path, "int8")
    assert size_on_disk(folder) < 0.5 * size_on_disk(tiny_model_dir)

    result, served = await serve(folder)
    assert_served(result)
    assert isinstance(served.model.layers[0].mlp.down_proj, torch.ao.nn.quantized.dynamic.Linear)
    # The served model is the stored one: the same greedy tokens as the quantized model that was saved.
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.inference_mode():
        expected = optimized.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                            max_new_tokens=MAX_TOKENS, do_sample=False)
    assert result.text == tokenizer.decode(expected[0, ids.shape[1]:], skip_special_tokens=True)
    # LLMQ_QUANTIZE=int8 quantizes the original at load the same way: the same text.
    at_load, _ = await serve(tiny_model_dir, quantize="int8")
    assert at_load.text == result.text


async def test_weight_only_int8_is_smaller_and_served(model, tokenizer, tiny_model_dir, tmp_path):
    optimized = quantization.weight_only(model, WeightOnly(type="weight_only", bits=8))
    assert optimized.serving["format"] == "torchao" and optimized.serving["config"] == "Int8WeightOnlyConfig"
    folder = save(optimized, tokenizer, tmp_path, "wo8")
    assert size_on_disk(folder) < 0.5 * size_on_disk(tiny_model_dir)

    result, served = await serve(folder)
    assert_served(result)
    assert type(served.model.layers[0].mlp.down_proj.weight).__name__ == "Int8Tensor"


async def test_weight_only_int4_runs_on_this_cpu(model, tokenizer, tmp_path):
    # IntxWeightOnlyConfig's int4 runs on any device; measured to here (torch 2.13 CPU, torchao 0.18).
    optimized = quantization.weight_only(model, WeightOnly(type="weight_only", bits=4, group_size=32))
    assert optimized.serving == {"format": "torchao", "dtype": "float32", "config": "IntxWeightOnlyConfig",
                                 "bits": 4, "group_size": 32}
    folder = save(optimized, tokenizer, tmp_path, "wo4")

    result, served = await serve(folder)
    assert_served(result)
    weight = served.model.layers[0].self_attn.q_proj.weight
    assert type(weight).__name__ == "IntxUnpackedToInt8Tensor" and weight.qdata.dtype == torch.int8
    assert int(weight.qdata.min()) >= -8 and int(weight.qdata.max()) <= 7  # int4 values


def test_qat_without_a_training_file_is_refused(model):
    with pytest.raises(StrategyError) as caught:
        quantization.qat(model, Qat(type="qat"), tune=None)
    assert caught.value.code == "training_file_required"


async def test_qat_trains_then_serves_as_weight_only(model, tokenizer, tmp_path):
    train, _ = finsent.generate(60, 0, seed=1)
    examples = [tokenize(tokenizer, parse_example(json.dumps(e))) for e in train]
    trained: list[bool] = []

    def tune(target, recovery: Recovery) -> None:
        # During QAT the linears are torchao's fake-quantized ones: training sees the rounding.
        assert type(target.model.layers[0].mlp.up_proj).__name__ == "FakeQuantizedLinear"
        trained.append(fine_tune(target, tokenizer, examples, recovery, learning_rate=1e-4, seed=0,
                                 work_dir=str(tmp_path / "work")))

    strategy = Qat(type="qat", bits=4, group_size=32, training=Recovery(n_epochs=1, batch_size=8))
    optimized = quantization.qat(model, strategy, tune)
    assert trained == [True]
    assert optimized.serving["config"] == "IntxWeightOnlyConfig" and optimized.figures["qat_epochs"] == 1
    folder = save(optimized, tokenizer, tmp_path, "qat4")

    result, served = await serve(folder)
    assert_served(result)
    assert type(served.model.layers[0].mlp.up_proj).__name__ == "Linear"
    assert type(served.model.layers[0].mlp.up_proj.weight).__name__ == "IntxUnpackedToInt8Tensor"


async def test_a_bf16_model_is_served_in_bf16_on_the_cpu(model, tokenizer, tmp_path):
    folder = save(Optimized(model.to(torch.bfloat16), {"format": "hf", "dtype": "bfloat16"}), tokenizer,
                  tmp_path, "bf16")
    result, served = await serve(folder)  # LLMQ_DTYPE=auto, which on the CPU is otherwise float32
    assert_served(result)
    assert next(served.parameters()).dtype == torch.bfloat16


async def test_quantized_models_refuse_adapters_and_other_dtypes(model, tokenizer, tmp_path):
    folder = save(quantization.int8_dynamic(model), tokenizer, tmp_path, "int8")
    (tmp_path / "adapters").mkdir()
    with pytest.raises(EngineError, match="stored quantized .int8_dynamic.: it cannot serve adapters"):
        await serve(folder, adapters_dir=str(tmp_path / "adapters"))
    with pytest.raises(EngineError, match="loads only in float32, not torch.bfloat16"):
        await serve(folder, dtype="bfloat16")


def test_a_plain_folder_has_no_serving_format(tiny_model_dir):
    assert artifact.serving_of(tiny_model_dir) is None


@pytest.mark.parametrize(("device", "serving", "dtype"), [
    ("cpu", None, torch.float32),
    ("cuda", None, torch.bfloat16),
    ("cpu", {"format": "hf", "dtype": "bfloat16"}, torch.bfloat16),
    ("cuda", {"format": "hf", "dtype": "float16"}, torch.float16),
    # A plain fp32 folder (pruned on a CPU trainer) runs on a GPU as its base model does ...
    ("cuda", {"format": "hf", "dtype": "float32"}, torch.bfloat16),
    # ... but quantized weights only in the dtype they were quantized from.
    ("cuda", {"format": "torchao", "dtype": "float32"}, torch.float32),
])
def test_auto_dtype_of_an_optimized_folder(device, serving, dtype):
    # The dtype choice alone (no GPU here to load on): LLMQ_DTYPE=auto with the folder's "serving".
    runner = ModelRunner.__new__(ModelRunner)
    runner.settings = WorkerSettings(engine="torch", model="unused", dtype="auto")
    assert runner._dtype(torch.device(device), serving) == dtype
