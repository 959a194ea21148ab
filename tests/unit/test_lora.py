"""Adapters in the torch engine, beyond what every engine promises
(test_engine_contract.py serves them by name beside the base model): LoRA and
(IA)^3 rows in one forward pass, more adapters asked for than the engine keeps
loaded, adapters published while it runs, folders it cannot load, and a worker
without adapters."""

from __future__ import annotations

import asyncio
import json
import shutil

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from shared.schema import Params
from workers.engines.base import GenerationRequest, collect
from workers.engines.torch.engine import TorchEngine
from workers.settings import WorkerSettings

PROMPT = "The weather this morning was cold and clear, and the wind"


def request(rid, adapter=None) -> GenerationRequest:
    return GenerationRequest(rid, Params(max_tokens=24, temperature=0), prompt=PROMPT, adapter=adapter)


def torch_engine(model_dir, adapters_dir=None, **settings) -> TorchEngine:
    return TorchEngine(WorkerSettings(engine="torch", model=str(model_dir), device="cpu",
                                      adapters_dir=str(adapters_dir) if adapters_dir else None, **settings))


def peft_greedy(model_dir, adapter_dir) -> str:
    """peft's own greedy text for one adapter (PeftModel.from_pretrained, then generate)."""
    from peft import PeftModel

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                                      adapter_dir).eval()
    ids = torch.tensor([tokenizer(PROMPT).input_ids])
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


async def test_ia3_lora_and_base_rows_run_in_one_forward_pass(tiny_model_dir, adapters_dir):
    engine = torch_engine(tiny_model_dir, adapters_dir, max_adapters=4, batch_max_size=8)
    await engine.start()
    names = [None, "tone-a", "style-a", "tone-b"]
    try:
        alone = {name: (await collect(engine, request(f"alone-{name}", name))).text for name in names}
        steps = []  # each forward pass's adapter per batch row
        forward = engine.runner.forward
        engine.runner.forward = lambda *args: steps.append(set(args[3])) or forward(*args)
        # The scheduler thread waits on this lock for new requests: holding it while all four
        # arrive makes them join the batch in one step.
        with engine._wakeup:
            tasks = [asyncio.ensure_future(collect(engine, request(str(i), name))) for i, name in enumerate(names)]
            while len(engine._arrived) < len(names):
                await asyncio.sleep(0)
        together = await asyncio.gather(*tasks)
    finally:
        await engine.close()
    assert len(set(alone.values())) == 4, "the adapters should change the text"
    assert [r.text for r in together] == [alone[name] for name in names]
    assert set(names) in steps


async def test_more_adapters_than_slots_take_turns(tiny_model_dir, adapters_dir):
    # One slot: each load unloads the other kind's last adapter too (peft's LoRA wrapping, the (IA)^3 hooks).
    engine = torch_engine(tiny_model_dir, adapters_dir, max_adapters=1)
    names = ("style-a", "tone-a", "style-b")
    await engine.start()
    try:
        alone = {name: (await collect(engine, request(name, name))).text for name in names}
        together = await asyncio.gather(*(collect(engine, request(f"{name}-{i}", name))
                                          for i in range(3) for name in names))
    finally:
        await engine.close()
    assert [r.text for r in together] == [alone[name] for name in names] * 3
    assert alone["tone-a"] == peft_greedy(tiny_model_dir, adapters_dir / "tone-a")
    assert len(engine.adapters.loaded) == 1


async def test_an_adapter_published_while_the_engine_runs_is_served(tiny_model_dir, adapters_dir, tmp_path):
    engine = torch_engine(tiny_model_dir, tmp_path)
    await engine.start()
    try:
        before = await collect(engine, request("before", "tone-a"))
        for name in ("tone-a", "style-a"):
            shutil.copytree(adapters_dir / name, tmp_path / name)
        after = await asyncio.gather(collect(engine, request("ia3", "tone-a")),
                                     collect(engine, request("lora", "style-a")))
    finally:
        await engine.close()
    assert before.finish_reason == "error" and before.error == "unknown adapter 'tone-a'"
    assert [r.text for r in after] == [peft_greedy(tiny_model_dir, adapters_dir / name)
                                       for name in ("tone-a", "style-a")]


async def test_an_adapter_folder_that_cannot_be_loaded_is_that_requests_error(tiny_model_dir, adapters_dir, tmp_path):
    # Half-copied: the config is there, the weights not yet (style-b's never come).
    for name in ("style-b", "tone-a", "style-a"):
        (tmp_path / name).mkdir()
        shutil.copy(adapters_dir / name / "adapter_config.json", tmp_path / name)
    (tmp_path / "garbled").mkdir()
    (tmp_path / "garbled" / "adapter_config.json").write_text("{not json")
    (tmp_path / "typeless").mkdir()
    (tmp_path / "typeless" / "adapter_config.json").write_text(json.dumps({"r": 8}))
    # Another model's (IA)^3 adapter: its vectors are one wider than this model's layers.
    shutil.copytree(adapters_dir / "tone-a", tmp_path / "tone-wide")
    vectors = load_file(tmp_path / "tone-wide" / "adapter_model.safetensors")
    save_file({key: torch.ones(v.shape[0] + 1, v.shape[1]) if v.shape[0] > 1 else torch.ones(1, v.shape[1] + 1)
               for key, v in vectors.items()}, tmp_path / "tone-wide" / "adapter_model.safetensors")
    engine = torch_engine(tiny_model_dir, tmp_path)
    await engine.start()
    try:
        broken = await asyncio.gather(*(collect(engine, request(name, name))
                                        for name in ("style-b", "tone-a", "style-a", "garbled", "typeless",
                                                     "tone-wide")),
                                      collect(engine, request("base")))
        for name in ("tone-a", "style-a"):  # the copy completes: the next request is served
            shutil.copytree(adapters_dir / name, tmp_path / name, dirs_exist_ok=True)
        whole = await asyncio.gather(*(collect(engine, request(f"{name}-2", name)) for name in ("tone-a", "style-a")))
        # peft's layers of the failed first LoRA load were taken off: only the whole adapter is on.
        loras = list(engine.adapters.model.peft.peft_config)
    finally:
        await engine.close()
    *refused, base = broken
    assert [r.finish_reason for r in refused] == ["error"] * 6
    assert refused[0].error.startswith("cannot load adapter 'style-b'")
    assert refused[1].error.startswith("cannot load adapter 'tone-a'")
    assert refused[2].error.startswith("cannot load adapter 'style-a'")
    assert refused[3].error.startswith("adapter 'garbled' has an unreadable adapter_config.json")
    assert refused[4].error == "adapter 'typeless': its adapter_config.json names no peft_type"
    assert "which does not fit this model's layer" in refused[5].error
    assert loras == ["style-a"]
    assert base.error is None and base.completion_tokens == 24
    assert [r.text for r in whole] == [peft_greedy(tiny_model_dir, adapters_dir / name)
                                       for name in ("tone-a", "style-a")]


async def test_no_adapters_dir_refuses_adapter_requests(tiny_model_dir):
    engine = torch_engine(tiny_model_dir)
    await engine.start()
    try:
        result = await collect(engine, request("x", "style-a"))
    finally:
        await engine.close()
    assert result.finish_reason == "error" and "LLMQ_ADAPTERS_DIR is not set" in result.error
