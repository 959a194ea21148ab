"""LoRA adapters in the torch engine, beyond what every engine promises
(test_engine_contract.py serves them by name beside the base model): more
adapters asked for than the engine keeps loaded, and a worker without adapters."""

from __future__ import annotations

import asyncio

from shared.schema import Params
from workers.engines.base import GenerationRequest, collect
from workers.engines.torch.engine import TorchEngine
from workers.settings import WorkerSettings

PROMPT = "The weather this morning was cold and clear, and the wind"


def request(rid, adapter=None) -> GenerationRequest:
    return GenerationRequest(rid, Params(max_tokens=24, temperature=0), prompt=PROMPT, adapter=adapter)


async def test_more_adapters_than_slots_take_turns(tiny_model_dir, lora_adapters_dir):
    engine = TorchEngine(WorkerSettings(engine="torch", model=str(tiny_model_dir), device="cpu",
                                        adapters_dir=str(lora_adapters_dir), max_adapters=1))
    await engine.start()
    try:
        alone = {name: (await collect(engine, request(name, name))).text for name in ("style-a", "style-b")}
        together = await asyncio.gather(*(collect(engine, request(f"{name}-{i}", name))
                                          for i in range(3) for name in ("style-a", "style-b")))
    finally:
        await engine.close()
    assert [r.text for r in together] == [alone["style-a"], alone["style-b"]] * 3
    assert list(engine.adapters.loaded) == ["style-b"] or list(engine.adapters.loaded) == ["style-a"]


async def test_no_adapters_dir_refuses_adapter_requests(tiny_model_dir):
    engine = TorchEngine(WorkerSettings(engine="torch", model=str(tiny_model_dir), device="cpu"))
    await engine.start()
    try:
        result = await collect(engine, request("x", "style-a"))
    finally:
        await engine.close()
    assert result.finish_reason == "error" and "LLMQ_ADAPTERS_DIR is not set" in result.error
