"""The gateway's pure fine-tuning pieces: a refused job body names the parameter as
OpenAI's clients read it, a training file is checked line by line as a trainer reads
it, and the objects' ids page only within their own job."""

from __future__ import annotations

import json

import pytest

from gateway.fine_tuning.objects import CHECKPOINT_ID, EVENT_ID, checkpoint_id, cursor_index, event_id, job_object
from gateway.fine_tuning.routes import parse_job_body
from gateway.fine_tuning.validation import MAX_LINE_BYTES, check_file
from gateway.openai_compat import OpenAIError

JOB = "ftjob-" + "0123456789abcdef01234567"
CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def _refusal(body: dict | bytes) -> OpenAIError:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    with pytest.raises(OpenAIError) as caught:
        parse_job_body(raw)
    assert caught.value.status == 400
    return caught.value


@pytest.mark.parametrize(("body", "param", "code"), [
    ({"model": "m"}, "training_file", "missing_required_parameter"),
    ({"model": "m", "training_file": "f", "epochs": 3}, "epochs", "unknown_parameter"),
    ({"model": "m", "training_file": "f", "hyperparameters": {"n_epochs": 51}}, "hyperparameters.n_epochs",
     "invalid_value"),
    ({"model": "m", "training_file": "f", "hyperparameters": {"learning_rate_multiplier": "fast"}},
     "hyperparameters.learning_rate_multiplier", "invalid_value"),
    ({"model": "m", "training_file": "f", "method": {"type": "lora", "lora": {"hyperparameters": {"rank": 0}}}},
     "method.lora.hyperparameters.rank", "invalid_value"),
    ({"model": "m", "training_file": "f", "method": {"type": "lora", "full": {}}}, "method", "invalid_combination"),
    ({"model": "m", "training_file": "f", "method": {"type": "adapter"}, "hyperparameters": {}}, "hyperparameters",
     "invalid_combination"),
    ({"model": "m", "training_file": "f", "integrations": [{"type": "wandb"}]}, "integrations",
     "unsupported_parameter"),
])
def test_a_refused_body_names_its_parameter(body, param, code):
    error = _refusal(body)
    assert (error.param, error.code) == (param, code), error.message


def test_a_body_that_is_not_json_is_refused_as_such():
    assert _refusal(b"{nope").code == "invalid_json"


def test_supervised_is_read_as_lora():
    job = parse_job_body(json.dumps({"model": "m", "training_file": "f", "method": {
        "type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2}}}}).encode())
    assert job.method.type == "lora" and job.method.hyperparameters.n_epochs == 2


def _file(tmp_path, lines: list[bytes]):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_a_sound_file_counts_its_examples_and_skips_blank_lines(tmp_path):
    prompt = json.dumps({"prompt": "a", "completion": "b"}).encode()
    assert check_file(_file(tmp_path, [json.dumps(CHAT).encode(), b"", prompt]), "file-x", "training_file") == (2, None)


@pytest.mark.parametrize(("lines", "words"), [
    ([json.dumps(CHAT).encode(), b"[1, 2]"], "line 2: not a JSON object"),
    ([b"\xff\xfe"], "line 1: not JSON"),
    ([b"[" * 100_000], "line 1: not JSON"),
    ([json.dumps({"messages": [CHAT["messages"][1], CHAT["messages"][0]]}).encode()], "line 1: the last message"),
    ([b"", b"  "], "no examples"),
    ([b"x" * (MAX_LINE_BYTES + 10)], f"line 1 is over {MAX_LINE_BYTES} bytes"),
])
def test_a_file_a_trainer_would_refuse_names_the_line(tmp_path, lines, words):
    _, problem = check_file(_file(tmp_path, lines), "file-x", "validation_file")
    assert problem is not None and words in problem.message, problem
    assert problem.code == "invalid_validation_file" and problem.param == "validation_file"


def test_an_event_or_checkpoint_id_pages_only_its_own_job():
    assert cursor_index(EVENT_ID, JOB, event_id(JOB, 7)) == 7
    assert cursor_index(CHECKPOINT_ID, JOB, checkpoint_id(JOB, 2)) == 2
    other = "ftjob-" + "f" * 24
    assert cursor_index(EVENT_ID, other, event_id(JOB, 7)) is None
    assert cursor_index(EVENT_ID, JOB, checkpoint_id(JOB, 2)) is None


def test_the_output_is_named_only_once_the_job_succeeded():
    job = {"id": JOB, "status": "running", "created_at": "1700000000", "model": "m", "training_file": "f",
           "seed": "3", "fine_tuned_model": "m:ft-0a1b2c3d", "method": {"type": "full"},
           "hyperparameters": {"n_epochs": 2}, "progress": {"step": 1, "eta_seconds": 60}}
    running = job_object(job)
    assert running["fine_tuned_model"] is None and running["estimated_finish"] is not None
    assert running["hyperparameters"] == {"n_epochs": 2, "batch_size": "auto", "learning_rate_multiplier": "auto"}
    assert running["method"] == {"type": "full", "full": {"hyperparameters": {"n_epochs": 2}}}
    done = job_object({**job, "status": "succeeded", "finished_at": "1700000100"})
    assert done["fine_tuned_model"] == "m:ft-0a1b2c3d" and done["estimated_finish"] is None
    assert done["finished_at"] == 1700000100
