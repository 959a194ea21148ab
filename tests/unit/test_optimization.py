"""Optimization jobs' pure pieces: a refused body names the parameter as fine-tuning's
does, outputs are named from their source and strategy, the trainers' topic carries both
kinds of job (a fine-tuning message parses exactly as before), the job object, and
`llmq optimize`'s settings from the command line."""

from __future__ import annotations

import json

import pytest

from deploy.cli import UsageError, strategy_settings
from gateway.openai_compat import OpenAIError
from gateway.optimization.objects import job_object
from gateway.optimization.routes import parse_body
from shared.optimization import (
    JOB_ID,
    OptimizationJobCreate,
    OptimizationMessage,
    optimized_name,
    parse_job_message,
    root_model,
)
from shared.training import MessageError, Method, TrainingMessage, split_fine_tuned

JOB = "optjob-" + "0123456789abcdef01234567"


def _refusal(body: dict | bytes) -> OpenAIError:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    with pytest.raises(OpenAIError) as caught:
        parse_body(raw)
    assert caught.value.status == 400
    return caught.value


@pytest.mark.parametrize(("body", "param", "code"), [
    ({"strategy": {"type": "int8_dynamic"}}, "model", "missing_required_parameter"),
    ({"model": "m"}, "strategy", "missing_required_parameter"),
    ({"model": "m", "strategy": {"type": "int3"}}, "strategy", "invalid_value"),
    ({"model": "m", "strategy": {"type": "prune_l1", "sparsity": 1.5}}, "strategy.sparsity", "invalid_value"),
    ({"model": "m", "strategy": {"type": "weight_only", "bits": 3}}, "strategy.bits", "invalid_value"),
    ({"model": "m", "strategy": {"type": "precision"}}, "strategy.dtype", "missing_required_parameter"),
    ({"model": "m", "strategy": {"type": "int8_dynamic", "bits": 8}}, "strategy.bits", "unknown_parameter"),
    ({"model": "m", "strategy": {"type": "prune_l1", "recovery": {"n_epochs": 0}}, "training_file": "f"},
     "strategy.recovery.n_epochs", "invalid_value"),
    ({"model": "m", "strategy": {"type": "qat"}}, "training_file", "invalid_combination"),
    ({"model": "m", "strategy": {"type": "prune_structured", "mlp_kept": 1.0}}, "strategy", "invalid_combination"),
    ({"model": "m", "strategy": {"type": "int8_dynamic"}, "suffix": "Not OK"}, "suffix", "invalid_value"),
    ({"model": "m", "strategy": {"type": "int8_dynamic"}, "method": {}}, "method", "unknown_parameter"),
    # its output's name (source + ":opt-…") would be longer than a request's `model` may be
    ({"model": "m" * 203, "strategy": {"type": "int8_dynamic"}}, "model", "invalid_value"),
])
def test_a_refused_body_names_its_parameter(body, param, code):
    error = _refusal(body)
    assert (error.param, error.code) == (param, code), error.message


def test_a_body_that_is_not_json_is_refused_as_such():
    assert _refusal(b"{nope").code == "invalid_json"


def test_a_sound_body_reads_with_its_defaults():
    job = parse_body(json.dumps({"model": "m", "strategy": {"type": "prune_l1", "recovery": {"n_epochs": 2.0}},
                                 "training_file": "f"}).encode())
    assert job.strategy.sparsity == 0.5 and job.strategy.recovery.n_epochs == 2


def test_an_output_is_named_from_its_source_and_strategy_and_splits_back():
    body = OptimizationJobCreate.model_validate({"model": "tiny:ft-x-0a1b2c3d", "strategy": {"type": "merge_lora"}})
    name = optimized_name(body.model, None, body.strategy, JOB)
    assert name == "tiny:ft-x-0a1b2c3d:opt-merged-01234567"
    assert split_fine_tuned(name) == ("tiny:ft-x-0a1b2c3d", "opt-merged-01234567")
    assert root_model(name) == "tiny" and root_model("tiny") == "tiny"
    assert optimized_name("tiny", "small", body.strategy, JOB) == "tiny:opt-small-01234567"
    assert JOB_ID.match(JOB) and not JOB_ID.match("ftjob-" + "0" * 24)


def test_the_topic_carries_both_kinds_and_a_fine_tuning_message_parses_as_before():
    tuning = TrainingMessage(id="ftjob-" + "0" * 24, model="tiny", training_file="file-1", method=Method(), seed=3,
                             fine_tuned_model="tiny:ft-0a1b2c3d")
    raw = tuning.model_dump_json().encode()
    assert "kind" not in json.loads(raw)
    assert parse_job_message(raw) == tuning
    optimizing = OptimizationMessage(id=JOB, model="tiny", base_model="tiny", strategy={"type": "int8_dynamic"},
                                     seed=1, optimized_model="tiny:opt-int8-01234567")
    parsed = parse_job_message(optimizing.model_dump_json().encode())
    assert isinstance(parsed, OptimizationMessage) and parsed == optimizing


@pytest.mark.parametrize("raw", [b"", b"[1]", b'{"kind": "optimization", "id": "x"}', b'{"id": "x"}', b"\xff"])
def test_a_message_of_neither_kind_is_a_message_error(raw):
    with pytest.raises(MessageError):
        parse_job_message(raw)


def test_the_job_object_names_its_output_only_once_it_succeeded():
    job = {"id": JOB, "model": "tiny", "strategy": {"type": "int8_dynamic"}, "status": "running", "seed": "4",
           "created_at": "100", "optimized_model": "tiny:opt-int8-01234567"}
    shown = job_object(job)
    assert shown["object"] == "optimization.job" and shown["optimized_model"] is None and shown["seed"] == 4
    done = job_object({**job, "status": "succeeded", "figures": {"size_bytes": 10}, "finished_at": "120"})
    assert done["optimized_model"] == "tiny:opt-int8-01234567" and done["figures"] == {"size_bytes": 10}


def test_llmq_optimize_reads_strategy_settings_from_the_command_line():
    assert strategy_settings(["sparsity=0.5", "recovery.n_epochs=2", "recovery.batch_size=auto", "bits=4"]) == {
        "sparsity": 0.5, "recovery": {"n_epochs": 2, "batch_size": "auto"}, "bits": 4}
    assert strategy_settings(['recovery={"n_epochs": 1}']) == {"recovery": {"n_epochs": 1}}
    for bad in (["sparsity"], ["=1"], ["bits=4", "bits.x=1"]):
        with pytest.raises(UsageError):
            strategy_settings(bad)


def test_an_integral_float_seed_is_the_integer_json_means():
    # 7.0 is an integer to JSON Schema and JSON clients (the fuzzer sends such); 7.5 is not.
    assert parse_body(json.dumps({"model": "m", "strategy": {"type": "int8_dynamic"}, "seed": 7.0}).encode()).seed == 7
    assert _refusal({"model": "m", "strategy": {"type": "int8_dynamic"}, "seed": 7.5}).param == "seed"
