"""`llmq recommend` on the tiny Llama: memory figures equal a hand computation from its
config and its loaded weights, the fit verdict flips where the memory runs out, registry
variants are measured on disk, a small batch-limit sweep of the real torch engine gives a
row per limit and a choice within its bound (none for an impossible bound), the training
recommendation is what the trainer's own rules give for the file, and the CLI's errors
are one line."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from deploy.cli import main
from shared.training import REGISTRY_METADATA, Method, TrainingMessage
from workers.optimize import recommend
from workers.training import finsent
from workers.training.run import resolve_hyperparameters
from workers.training.settings import TrainerSettings


@pytest.fixture(autouse=True)
def empty_registry(tmp_path, monkeypatch):
    """A registry of this test's own (nothing of the machine's .llmq/registry is read)."""
    registry = tmp_path / "registry"
    (registry / "models").mkdir(parents=True)
    monkeypatch.setenv("LLMQ_REGISTRY_DIR", str(registry))
    return registry


def test_memory_figures_are_the_models_own(tiny_model_dir):
    config = json.loads((tiny_model_dir / "config.json").read_text())
    loaded = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    parameters = sum(p.numel() for p in loaded.parameters())
    kv_fp32 = 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * config["head_dim"] * 4

    report = recommend.recommend_memory(str(tiny_model_dir), 1.0, context=128, concurrency=2)

    assert report["shape"]["parameters"] == parameters
    variants = {v["name"]: v for v in report["variants"]}
    assert set(variants) == {"float32", "bfloat16", "float16", "int8", "int4"}
    assert variants["float32"]["weights_bytes"] == parameters * 4
    assert variants["bfloat16"]["weights_bytes"] == variants["float16"]["weights_bytes"] == parameters * 2
    assert variants["float32"]["kv_bytes_per_token"] == kv_fp32
    assert variants["bfloat16"]["kv_bytes_per_token"] == kv_fp32 // 2
    assert variants["float32"]["need_bytes"] == parameters * 4 + kv_fp32 * 128 * 2
    # int8: the linear layers' weights at a byte each with a float32 scale per output channel, the rest float32.
    linears = [m.weight for m in loaded.modules() if isinstance(m, torch.nn.Linear)]
    linear = sum(w.numel() for w in linears)
    assert variants["int8"]["weights_bytes"] == linear + 4 * sum(w.shape[0] for w in linears) + 4 * (parameters - linear)
    assert variants["int4"]["weights_bytes"] < variants["int8"]["weights_bytes"] < variants["bfloat16"]["weights_bytes"]


def test_the_fit_flips_where_the_memory_runs_out(tiny_model_dir):
    need = recommend.recommend_memory(str(tiny_model_dir), 1.0, context=256, concurrency=3,
                                      headroom=0.1)["variants"][0]["need_bytes"]  # float32
    enough = need / 2**30 / 0.9 * (1 + 1e-9)

    fits = recommend.recommend_memory(str(tiny_model_dir), enough, context=256, concurrency=3, headroom=0.1)
    short = recommend.recommend_memory(str(tiny_model_dir), enough * (1 - 1e-4), context=256, concurrency=3,
                                       headroom=0.1)

    assert (fits["variants"][0]["name"], fits["variants"][0]["fits"], fits["variants"][0]["max_concurrency"]) == \
        ("float32", True, 3)
    assert (short["variants"][0]["fits"], short["variants"][0]["max_concurrency"]) == (False, 2)
    assert "10% kept free" in recommend.memory_text(short)


def test_registry_variants_are_measured_on_disk(tiny_model_dir, empty_registry):
    folder = empty_registry / "models" / "opt-bf16-0a1b2c3d"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).save_pretrained(folder)
    (folder / REGISTRY_METADATA).write_text(json.dumps({
        "model": "tiny-llama:opt-bf16-0a1b2c3d", "base_model": "tiny-llama", "source_model": "tiny-llama",
        "method": "optimization", "serving": {"format": "hf", "dtype": "bfloat16"}}))

    report = recommend.recommend_memory(str(tiny_model_dir), 1.0, context=128, concurrency=1)

    variant = next(v for v in report["variants"] if v["name"] == "tiny-llama:opt-bf16-0a1b2c3d")
    assert variant["weights_bytes"] == (folder / "model.safetensors").stat().st_size
    assert variant["kv_dtype"] == "bfloat16" and variant["source"].startswith("measured")


def test_batch_sweep_gives_a_row_per_limit_and_a_choice_within_the_bound(tiny_model_dir):
    report = recommend.recommend_batch(str(tiny_model_dir), 1000.0, limits=[1, 4], requests_per_limit=2,
                                       max_tokens=8, prompt_tokens=16)

    rows = {r["limit"]: r for r in report["rows"]}
    assert sorted(rows) == [1, 4]
    assert [(r["requests"], r["tokens"]) for r in report["rows"]] == [(2, 16), (8, 64)]
    assert report["choice"] in rows and rows[report["choice"]]["tpot_p99_ms"] <= 1000.0
    assert report["setting"] == f"LLMQ_BATCH_MAX_SIZE={report['choice']}"
    assert f"use: LLMQ_BATCH_MAX_SIZE={report['choice']}" in recommend.batch_text(report)
    # The same measurements against a bound no limit meets: none, naming the smallest limit's p99.
    rows_measured = [recommend.BatchRow(**r) for r in report["rows"]]
    best, why = recommend.choose_limit(rows_measured, 0.001)
    assert best is None and why.startswith("none:") and "the smallest, 1," in why


def test_an_impossible_bound_recommends_no_setting(tiny_model_dir, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["recommend", "batch", "--model", str(tiny_model_dir), "--tpot-p99-ms", "0.001", "--limits", "1",
              "--requests-per-limit", "1", "--max-tokens", "4", "--json"])

    assert exit_.value.code == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["choice"], report["setting"]) == (None, None)
    assert report["reason"].startswith("none: no limit keeps p99 TPOT within 0.001 ms")


def test_training_recommendation_is_what_the_trainer_would_use(tiny_model_dir, tmp_path):
    train, _ = finsent.generate(100, 0, seed=1)
    path = tmp_path / "train.jsonl"
    finsent.write_jsonl(path, train)

    report = recommend.recommend_training(path, "lora", model=str(tiny_model_dir), measure_steps=2)

    # The trainer holds out 10% of a file given alone and trains on the rest.
    assert (report["lines"], report["train_examples"], report["heldout_examples"]) == (100, 90, 10)
    method = Method.model_validate({"type": "lora"})
    job = TrainingMessage(id="ftjob-0123456789abcdef01234567", model="tiny-llama", training_file="file-x",
                          method=method, seed=0, fine_tuned_model="tiny-llama:ft-01234567")
    assert report["hyperparameters"] == resolve_hyperparameters(job, TrainerSettings(model=str(tiny_model_dir)), 90)
    hp = report["hyperparameters"]
    assert (hp["n_epochs"], hp["batch_size"], hp["rank"]) == (20, 2, 8)
    assert report["steps"] == math.ceil(90 / 2) * 20
    estimate, step = report["estimate_seconds"], report["measured"]["seconds_per_step"]
    assert estimate["steps"] == pytest.approx(step * report["steps"])
    assert report["estimated_seconds"] == pytest.approx(sum(estimate.values()))
    text = recommend.training_text(report)
    assert "ceil(5400 / 90)" in text and "one per 32 training examples (90 // 32 = 2)" in text
    assert "900 optimizer steps" in text and "estimated training time" in text


@pytest.mark.parametrize("argv, message", [
    (["recommend", "training", "--training-file", "no/such/file.jsonl"],
     "llmq recommend training: training file 'no/such/file.jsonl' not found"),
    (["recommend", "memory", "--model", "no-such-model", "--memory-gib", "8"],
     "llmq recommend memory: unknown model 'no-such-model': not a local model folder nor a registry model's name"),
    (["recommend", "batch", "--model", "tiny-llama:opt-int8-0a1b2c3d", "--tpot-p99-ms", "50"],
     "llmq recommend batch: unknown model 'tiny-llama:opt-int8-0a1b2c3d': no folder"),
])
def test_errors_are_one_line_and_a_failed_exit(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)

    assert exit_.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(message)
