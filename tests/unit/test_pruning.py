"""Pruning, precision and merged-LoRA strategies on the tiny model: structured pruning
really shrinks the matrices, computes what the original computes without the removed
units, saves and loads as a plain HF model and is served by the torch engine; L1 pruning
zeroes the asked share, also through a recovery fine-tune; bf16 weights are saved as
bf16; a merged LoRA gives the peft model's logits; what can't run is refused by code."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from shared.optimization import STRATEGY
from shared.schema import Params
from shared.training import parse_example
from workers.engines.base import GenerationRequest, collect
from workers.engines.torch.engine import TorchEngine
from workers.optimize import pruning, weights
from workers.optimize.strategies import Data, StrategyError
from workers.optimize.tune import fine_tune
from workers.settings import WorkerSettings
from workers.training import finsent
from workers.training.data import tokenize

PROMPT = "The weather this morning was cold and clear, and the wind"
IDS = torch.tensor([[1, 20, 30, 40, 50, 60, 70, 80]])


def strategy(**body):
    return STRATEGY.validate_python(body)


def load(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def finsent_train(tokenizer):
    train, _ = finsent.generate(40, 0, seed=7)
    return [tokenize(tokenizer, parse_example(json.dumps(line))) for line in train]


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def kept_blocks(original: torch.Tensor, pruned: torch.Tensor, unit: int) -> list[int]:
    """Which `unit`-row blocks of an original weight the pruned weight holds (found by value)."""
    blocks = original.view(-1, unit, original.shape[-1])
    return [next(i for i, b in enumerate(blocks) if torch.equal(b, p)) for p in pruned.view(-1, unit, pruned.shape[-1])]


# ---- structured ------------------------------------------------------------------


def test_structured_pruning_shrinks_every_matrix_and_computes_the_original_without_the_removed_units(
        tiny_model_dir):
    original = load(tiny_model_dir)
    result = pruning.prune_structured(load(tiny_model_dir), strategy(
        type="prune_structured", heads_kept=0.5, mlp_kept=0.5, layers_kept=0.5), None, None)
    model, figures = result.model, result.figures

    assert result.serving == {"format": "hf", "dtype": "float32"}
    assert figures["shape_before"] == {"layers": 4, "attention_heads": 4, "kv_heads": 2, "head_dim": 64,
                                       "intermediate_size": 768}
    assert figures["shape_after"] == {"layers": 2, "attention_heads": 2, "kv_heads": 1, "head_dim": 64,
                                      "intermediate_size": 384}
    assert figures["parameters_before"] == sum(p.numel() for p in original.parameters())
    assert figures["parameters_after"] == sum(p.numel() for p in model.parameters()) < figures["parameters_before"]
    assert len(model.model.layers) == 2
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        assert (attn.q_proj.weight.shape, attn.k_proj.weight.shape, attn.v_proj.weight.shape,
                attn.o_proj.weight.shape) == ((128, 256), (64, 256), (64, 256), (256, 128))
        assert (mlp.gate_proj.weight.shape, mlp.up_proj.weight.shape, mlp.down_proj.weight.shape) == (
            (384, 256), (384, 256), (256, 384))

    # The original with the same units silenced (removed heads' and channels' inputs to
    # o_proj / down_proj zeroed, removed layers skipped) gives the pruned model's logits.
    kept_layers = [i for i in range(4) if i not in figures["layers_removed"]]
    with torch.no_grad():
        for new, old in enumerate(kept_layers):
            before, after = original.model.layers[old], model.model.layers[new]
            groups = kept_blocks(before.self_attn.k_proj.weight, after.self_attn.k_proj.weight, 64)
            channels = kept_blocks(before.mlp.gate_proj.weight, after.mlp.gate_proj.weight, 1)
            heads = [h for g in groups for h in (2 * g, 2 * g + 1)]  # 2 query heads share each KV head
            o_columns = before.self_attn.o_proj.weight.view(256, 4, 64)
            o_columns[:, [h for h in range(4) if h not in heads]] = 0
            before.mlp.down_proj.weight[:, [c for c in range(768) if c not in channels]] = 0
    original.model.layers = torch.nn.ModuleList(original.model.layers[i] for i in kept_layers)
    torch.testing.assert_close(logits(model), logits(original))


async def test_a_structurally_pruned_model_saves_loads_and_is_served_by_the_torch_engine(
        tiny_model_dir, tokenizer, tmp_path):
    result = pruning.prune_structured(load(tiny_model_dir), strategy(
        type="prune_structured", heads_kept=0.5, mlp_kept=0.5, layers_kept=0.75), None, None, tokenizer)
    folder = tmp_path / "pruned"
    result.model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)

    loaded = load(folder)
    assert (loaded.config.num_hidden_layers, loaded.config.num_attention_heads, loaded.config.num_key_value_heads,
            loaded.config.intermediate_size) == (3, 2, 1, 384)
    torch.testing.assert_close(logits(loaded), logits(result.model))

    ids = torch.tensor([tokenizer(PROMPT).input_ids])
    with torch.no_grad():
        out = loaded.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)
    expected = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    engine = TorchEngine(WorkerSettings(engine="torch", model=str(folder), device="cpu"))
    await engine.start()
    try:
        served = await collect(engine, GenerationRequest("r", Params(max_tokens=16, temperature=0), prompt=PROMPT))
    finally:
        await engine.close()
    assert (served.completion_tokens, served.finish_reason, served.text) == (16, "length", expected)


def test_structured_pruning_calibrates_on_the_training_examples_and_recovers(tiny_model_dir, tokenizer,
                                                                            finsent_train, tmp_path):
    def tune(model, recovery):
        fine_tune(model, tokenizer, finsent_train, recovery, learning_rate=1e-3, seed=0, work_dir=str(tmp_path))

    data = Data(train=finsent_train, heldout=[])
    plain = pruning.prune_structured(load(tiny_model_dir), strategy(type="prune_structured", mlp_kept=0.25),
                                     data, None)
    result = pruning.prune_structured(load(tiny_model_dir), strategy(
        type="prune_structured", mlp_kept=0.25, recovery={"batch_size": 8}), data, tune)
    assert result.figures["recovered"] is True and plain.figures["recovered"] is False
    assert result.figures["calibration_tokens"] == sum(len(x.input_ids) for x in finsent_train) // 256 * 256
    assert result.figures["shape_after"] == plain.figures["shape_after"] == {
        "layers": 4, "attention_heads": 4, "kv_heads": 2, "head_dim": 64, "intermediate_size": 192}
    # The recovery trained the pruned model (same cut, then different weights).
    up = [r.model.model.layers[0].mlp.up_proj.weight for r in (result, plain)]
    assert up[0].shape == up[1].shape and not torch.equal(*up)


def test_structured_pruning_refuses_what_it_cannot_do(tiny_model_dir):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=64))
    with pytest.raises(StrategyError) as refused:
        pruning.prune_structured(gpt2, strategy(type="prune_structured"), None, None)
    assert refused.value.code == "not_supported"

    with pytest.raises(StrategyError) as refused:
        pruning.prune_structured(load(tiny_model_dir), strategy(type="prune_structured", recovery={}), None, None)
    assert refused.value.code == "training_file_required"

    with pytest.raises(StrategyError) as refused:  # 2 KV groups x 0.9 rounds to 2: nothing removed
        pruning.prune_structured(load(tiny_model_dir), strategy(type="prune_structured", heads_kept=0.9,
                                                                mlp_kept=1.0), None, None)
    assert refused.value.code == "invalid_strategy"


# ---- L1 --------------------------------------------------------------------------


def test_l1_pruning_zeroes_the_asked_share_and_a_recovery_keeps_them_zero(tiny_model_dir, tokenizer,
                                                                          finsent_train, tmp_path):
    model = load(tiny_model_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def tune(model, recovery):
        fine_tune(model, tokenizer, finsent_train, recovery, learning_rate=1e-3, seed=0, work_dir=str(tmp_path))

    result = pruning.prune_l1(model, strategy(type="prune_l1", sparsity=0.3, recovery={"batch_size": 8}), tune)
    figures = result.figures
    assert result.model is model and result.serving == {"format": "hf", "dtype": "float32"}
    assert figures["pruned_layers"] == 4 * 7 and figures["pruned_layers_sparsity"] == pytest.approx(0.3, abs=1e-4)
    assert 0 < figures["model_sparsity"] < 0.3  # embeddings, head and norms stay dense
    assert figures["nonzero_parameters"] == sum(int(p.count_nonzero()) for p in model.parameters())
    assert "no speed-up" in figures["note"]

    params = dict(model.named_parameters())
    assert "model.layers.0.self_attn.q_proj.weight" in params  # masks made permanent: plain weights again
    for name, weight in params.items():
        if ".layers." in name and name.endswith("proj.weight"):
            zeros = weight == 0
            assert zeros.float().mean().item() == pytest.approx(0.3, abs=1e-3)
            assert not torch.equal(weight[~zeros], before[name][~zeros])  # the recovery trained it
        elif name in ("model.embed_tokens.weight", "lm_head.weight"):  # left dense (the <pad> row is zero)
            assert int((weight == 0).sum()) == int((before[name] == 0).sum())

    model.save_pretrained(tmp_path / "l1")
    saved = load_file(tmp_path / "l1" / "model.safetensors")
    assert (saved["model.layers.1.mlp.down_proj.weight"] == 0).float().mean().item() == pytest.approx(0.3, abs=1e-3)


def test_l1_pruning_with_a_recovery_needs_a_training_file(tiny_model_dir):
    model = load(tiny_model_dir)
    with pytest.raises(StrategyError) as refused:
        pruning.prune_l1(model, strategy(type="prune_l1", recovery={}), None)
    assert refused.value.code == "training_file_required"
    assert int((model.model.layers[0].mlp.up_proj.weight == 0).sum()) == 0  # refused before any change


# ---- precision and merged LoRA ---------------------------------------------------


def test_bf16_precision_saves_bf16_weights_and_float16_is_refused_on_cpu(tiny_model_dir, tmp_path):
    result = weights.precision(load(tiny_model_dir), strategy(type="precision", dtype="bfloat16"))
    assert result.serving == {"format": "hf", "dtype": "bfloat16"}
    assert result.model.model.rotary_emb.inv_freq.dtype == torch.float32  # as from_pretrained builds it
    torch.testing.assert_close(logits(result.model),  # the model evaluated is the one served
                               logits(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)))
    result.model.save_pretrained(tmp_path / "bf16")
    saved = load_file(tmp_path / "bf16" / "model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}
    assert next(AutoModelForCausalLM.from_pretrained(tmp_path / "bf16").parameters()).dtype == torch.bfloat16

    model = load(tiny_model_dir)
    with pytest.raises(StrategyError) as refused:
        weights.precision(model, strategy(type="precision", dtype="float16"))
    assert refused.value.code == "not_available_here" and "CUDA" in str(refused.value)


def test_merged_lora_gives_the_peft_models_logits_and_other_sources_are_refused(tiny_model_dir):
    from peft import IA3Config, LoraConfig, get_peft_model

    torch.manual_seed(0)
    # init_lora_weights=False: lora_B starts random, not zero, so the adapter changes the output.
    peft_model = get_peft_model(load(tiny_model_dir), LoraConfig(
        r=8, lora_alpha=32, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)).eval()
    expected = logits(peft_model)
    assert not torch.allclose(expected, logits(load(tiny_model_dir)), atol=1e-3)

    result = weights.merge_lora(peft_model)
    assert type(result.model).__name__ == "LlamaForCausalLM"
    assert not any("lora_" in name for name, _ in result.model.named_parameters())
    assert result.serving == {"format": "hf", "dtype": "float32"}
    torch.testing.assert_close(logits(result.model), expected, rtol=1e-4, atol=1e-4)

    ia3 = get_peft_model(load(tiny_model_dir), IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                                          feedforward_modules=["down_proj"]))
    for source in (load(tiny_model_dir), ia3):
        with pytest.raises(StrategyError) as refused:
            weights.merge_lora(source)
        assert refused.value.code == "invalid_source"
