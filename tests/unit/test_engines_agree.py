"""The torch and vLLM engines read a request the same way: they serve or refuse
the same adapter names, in the same words, and turn the same prompt or
conversation into the same token ids.

Each engine is asked through its own code path: the torch engine's request
intake (`_prepare`, which tokenizes and checks a request before it may join the
batch) and the vLLM engine's mapping (`_to_vllm`, which builds the prompt and
LoRARequest it hands vLLM). This runs where vLLM is not installed (the main
venv), so vLLM's SamplingParams and LoRARequest are stand-ins; the tokenizer is
the tiny model's real one on both sides. Where vLLM is installed,
test_engine_contract.py runs the real one on the same promises.
"""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest
from transformers import AutoTokenizer

from shared.schema import ChatMessage, Params
from workers.engines.base import GenerationRequest
from workers.engines.torch.engine import TorchEngine
from workers.engines.torch.row import Row, Stream
from workers.engines.vllm.adapters import Adapters
from workers.engines.vllm.engine import VllmEngine
from workers.engines.vllm.mapping import error_text
from workers.settings import WorkerSettings

# The names _to_vllm takes from vllm (vllm/sampling_params.py, vllm/lora/request.py).
STAND_IN_VLLM = SimpleNamespace(SamplingParams=lambda **kwargs: kwargs,
                                RequestOutputKind=SimpleNamespace(DELTA="DELTA"),
                                LoRARequest=lambda name, int_id, path: (name, int_id, path))

NOT_SERVED = "this worker serves no adapters (LLMQ_ADAPTERS_DIR is not set); asked for 'sql'"


@pytest.fixture(scope="module")
def adapters_dir(tmp_path_factory):
    """`sql` is an adapter; so is a folder named `my adapter`, and one beside the
    directory that `../x` would reach if names were paths."""
    base = tmp_path_factory.mktemp("agree")
    for folder in (base / "adapters" / "sql", base / "adapters" / "my adapter", base / "x"):
        folder.mkdir(parents=True)
        (folder / "adapter_config.json").write_text(json.dumps({"r": 8, "peft_type": "LORA"}))
    return base / "adapters"


def start_torch(model_dir, adapters_dir=None):
    engine = TorchEngine(WorkerSettings(engine="torch", model=str(model_dir), device="cpu",
                                  adapters_dir=str(adapters_dir) if adapters_dir else None))
    asyncio.run(engine.start())
    return engine


@pytest.fixture(scope="module")
def torch_engine(tiny_model_dir, adapters_dir):
    engine = start_torch(tiny_model_dir, adapters_dir)
    yield engine
    asyncio.run(engine.close())


@pytest.fixture(scope="module")
def torch_engine_without_adapters(tiny_model_dir):
    engine = start_torch(tiny_model_dir)
    yield engine
    asyncio.run(engine.close())


def vllm_engine(model_dir, adapters_dir=None) -> VllmEngine:
    engine = VllmEngine(WorkerSettings(engine="vllm", model=str(model_dir)))
    # vLLM loads the model's tokenizer itself: a tokenizer of its own, from the same files.
    engine._attach(STAND_IN_VLLM, None, AutoTokenizer.from_pretrained(model_dir), Adapters(adapters_dir, 16))
    return engine


def request(adapter=None, prompt="Hi", messages=None) -> GenerationRequest:
    return GenerationRequest("r", Params(), prompt=None if messages else prompt, messages=messages, adapter=adapter)


def torch_reads(engine: TorchEngine, req: GenerationRequest) -> Row:
    row = Row(req, Stream())
    engine._prepare(row)
    return row


def torch_refusal(engine: TorchEngine, adapter: str) -> str | None:
    return torch_reads(engine, request(adapter)).error


def vllm_refusal(engine: VllmEngine, adapter: str) -> str | None:
    try:
        engine._to_vllm(request(adapter))
    except Exception as exc:  # what the engine makes that request's error
        return error_text(exc)
    return None


def vllm_prompt_ids(engine: VllmEngine, req: GenerationRequest) -> list[int]:
    return engine._to_vllm(req)[0]["prompt_token_ids"]


@pytest.mark.parametrize("name, refusal", [
    ("sql", None),
    ("my adapter", "invalid adapter name 'my adapter'"),
    ("../x", "invalid adapter name '../x'"),
    (".", "invalid adapter name '.'"),
    ("..", "invalid adapter name '..'"),
    ("__base__", "invalid adapter name '__base__'"),
    ("nope", "unknown adapter 'nope'"),
])
async def test_both_engines_serve_or_refuse_an_adapter_name_in_the_same_words(
        torch_engine, tiny_model_dir, adapters_dir, name, refusal):
    assert torch_refusal(torch_engine, name) == refusal
    assert vllm_refusal(vllm_engine(tiny_model_dir, adapters_dir), name) == refusal


async def test_both_engines_without_an_adapters_dir_refuse_every_adapter(torch_engine_without_adapters,
                                                                         tiny_model_dir):
    assert torch_refusal(torch_engine_without_adapters, "sql") == NOT_SERVED
    assert vllm_refusal(vllm_engine(tiny_model_dir), "sql") == NOT_SERVED


@pytest.mark.parametrize("prompt", ["Hi", "A queue is", "  two spaces, ünïcode ☃ and\ttabs"])
async def test_both_engines_turn_a_prompt_into_the_same_token_ids(torch_engine, tiny_model_dir, prompt):
    torch_ids = torch_reads(torch_engine, request(prompt=prompt)).prompt_ids
    assert torch_ids[0] == torch_engine.tokenizer.bos_token_id
    assert vllm_prompt_ids(vllm_engine(tiny_model_dir), request(prompt=prompt)) == torch_ids


@pytest.mark.parametrize("with_template", [True, False], ids=["with a chat template", "without a chat template"])
async def test_both_engines_turn_a_conversation_into_the_same_token_ids(torch_engine, tiny_model_dir,
                                                                         monkeypatch, with_template):
    vllm = vllm_engine(tiny_model_dir)
    if not with_template:
        monkeypatch.setattr(torch_engine.tokenizer, "chat_template", None)
        monkeypatch.setattr(vllm._tokenizer, "chat_template", None)
    messages = [ChatMessage(role="system", content="be brief"), ChatMessage(role="user", content="hi")]
    torch_ids = torch_reads(torch_engine, request(messages=messages)).prompt_ids
    assert torch_engine.tokenizer.decode(torch_ids) == "<s>system: be brief\nuser: hi\nassistant:"
    assert vllm_prompt_ids(vllm, request(messages=messages)) == torch_ids
