"""The trainer's run of a fine-tuning job, for real: the tiny Llama trained with each
method on a few dozen lines of the shipped sentiment task, published to a registry
and loaded back; stopped and resumed from its checkpoint; refused for bad files,
over-long lines and a model that doesn't improve."""

from __future__ import annotations

import json
import resource
import shutil
import signal
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from shared.training import REGISTRY_METADATA, Example, Method, TrainingMessage, fine_tuned_name
from workers.engines.common import prompt_ids
from workers.training import evaluate, finsent
from workers.training.checkpoints import COMPLETE, Hooks
from workers.training.data import IGNORE, load_file, tokenize
from workers.training.run import remove_work_dir, resolve_hyperparameters, run_job
from workers.training.settings import TrainerSettings

JOB_ID = "ftjob-0123456789abcdef01234567"


class Recorder:
    """The service's side of the hooks: keeps what a run reported; stops it after `stop_at` steps."""

    def __init__(self, stop_at: int | None = None):
        self.progress, self.events, self.checkpoints = [], [], []
        self.stop_at, self.steps = stop_at, 0

    def should_stop(self) -> bool:
        self.steps += 1
        return self.stop_at is not None and self.steps >= self.stop_at

    def hooks(self) -> Hooks:
        return Hooks(progress=self.progress.append, checkpoint=self.checkpoints.append,
                     event=lambda message, level, data: self.events.append((message, level, data)),
                     should_stop=self.should_stop)

    def event(self, start: str) -> tuple[str, str, dict]:
        return next(e for e in self.events if e[0].startswith(start))


@pytest.fixture
def settings(tiny_model_dir, tmp_path) -> TrainerSettings:
    files = tmp_path / "files"
    files.mkdir()
    train, heldout = finsent.generate(24, 6, seed=3)
    finsent.write_jsonl(files / "file-train.jsonl", train)
    finsent.write_jsonl(files / "file-heldout.jsonl", heldout)
    return TrainerSettings(model=str(tiny_model_dir), files_dir=files, registry_dir=tmp_path / "registry",
                           training_dir=tmp_path / "training", checkpoint_steps=2, logging_steps=1)


def message(method: str = "lora", validation_file: str | None = "file-heldout", training_file: str = "file-train",
            **hyperparameters) -> TrainingMessage:
    hp = {"n_epochs": 2, "batch_size": 4, **hyperparameters}
    return TrainingMessage(id=JOB_ID, model="tiny-llama", training_file=training_file, validation_file=validation_file,
                           method=Method.model_validate({"type": method, method: {"hyperparameters": hp}}), seed=7,
                           fine_tuned_model=fine_tuned_name("tiny-llama", "finsent", JOB_ID))


def test_loss_is_on_the_completion_only_and_prompts_tokenize_as_served(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    chat = Example.model_validate({"messages": [{"role": "user", "content": "Acme's profit rose 4%."}],
                                   "completion": "positive"})
    plain = Example(prompt="Acme's profit fell 4%. Sentiment:", completion=" negative")
    for example in (chat, plain):
        item = tokenize(tokenizer, example)
        served = prompt_ids(tokenizer, example.prompt, example.messages)
        assert item.input_ids[:len(served)] == served
        assert item.labels[:len(served)] == [IGNORE] * len(served)
        answer = item.labels[len(served):]
        assert answer[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(answer, skip_special_tokens=True) == example.completion
    assert tokenizer.decode(tokenize(tokenizer, chat).input_ids).startswith("<s>user: Acme's profit rose 4%.\nassistant:")


def loaded(path: Path, method: str, base_dir: Path):
    if method == "full":
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), AutoTokenizer.from_pretrained(path)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(base, path), AutoTokenizer.from_pretrained(base_dir)


@pytest.mark.parametrize("method", ["lora", "adapter", "full"])
def test_each_method_trains_and_publishes_a_loadable_model(method, settings, tiny_model_dir):
    recorder = Recorder()
    result = run_job(message(method), settings, recorder.hooks())

    assert result.status == "succeeded", result.error_message
    assert result.eval["after"]["eval_loss"] < result.eval["before"]["eval_loss"]
    assert result.trained_tokens > 0
    folder = Path(result.output_path)
    assert folder == settings.registry_dir / ("models" if method == "full" else "adapters") / "ft-finsent-01234567"
    meta = json.loads((folder / REGISTRY_METADATA).read_text())
    assert (meta["job_id"], meta["method"], meta["base_model"]) == (JOB_ID, method, "tiny-llama")
    assert meta["hyperparameters"]["n_epochs"] == 2 and meta["eval"] == result.eval
    # What was published is the trained model: loaded back, it scores what the run reported.
    model, tokenizer = loaded(folder, method, tiny_model_dir)
    heldout = load_file(settings.files_dir, "file-heldout", tokenizer, 2048, "invalid_validation_file")
    assert evaluate.figures(model, tokenizer, heldout)["eval_loss"] == pytest.approx(
        result.eval["after"]["eval_loss"], abs=1e-3)
    assert [p["step"] for p in recorder.progress][-1] == 12  # 24 lines / batch 4 × 2 epochs
    assert [c["step"] for c in recorder.checkpoints] == [2, 4, 6, 8, 10, 12]
    # Nothing half-published beside it.
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]


def test_a_stopped_job_resumes_from_its_checkpoint(settings):
    first = Recorder(stop_at=3)
    stopped = run_job(message(), settings, first.hooks())
    assert stopped.status == "stopped"
    assert first.checkpoints[-1]["step"] == 3
    assert (Path(first.checkpoints[-1]["path"]) / COMPLETE).exists()
    assert not settings.registry_dir.exists()

    second = Recorder()
    result = run_job(message(), settings, second.hooks())
    assert result.status == "succeeded", result.error_message
    assert second.event("Training resumed")[2] == {"step": 3}
    assert [p["step"] for p in second.progress][0] == 4
    assert [p["step"] for p in second.progress][-1] == 12
    remove_work_dir(settings, JOB_ID)
    assert not (settings.training_dir / JOB_ID).exists()


def test_a_half_written_checkpoint_is_skipped(settings):
    assert run_job(message(), settings, Recorder(stop_at=3).hooks()).status == "stopped"
    # A save cut short at step 4: the folder is there but was never marked complete.
    work = settings.training_dir / JOB_ID
    shutil.copytree(work / "checkpoint-3", work / "checkpoint-4")
    (work / "checkpoint-4" / COMPLETE).unlink()
    (work / "checkpoint-4" / "optimizer.pt").write_bytes(b"\0" * 10)

    recorder = Recorder()
    result = run_job(message(), settings, recorder.hooks())
    assert result.status == "succeeded", result.error_message
    assert recorder.event("Skipped incomplete checkpoints")[2] == {"steps": [4]}
    assert recorder.event("Training resumed")[2] == {"step": 3}


def test_a_failed_checkpoint_save_fails_the_job_and_keeps_the_previous_one(settings):
    assert run_job(message(), settings, Recorder(stop_at=1).hooks()).status == "stopped"
    # A full disk, for real writes: files may not grow past 64 KiB (the write fails with
    # EFBIG instead of the process being signalled), so the next checkpoint can't be saved.
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (65_536, limits[1]))
    try:
        failed = run_job(message(), settings, Recorder().hooks())
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, previous)
    assert (failed.status, failed.error_code) == ("failed", "checkpoint_failed")
    assert "could not save a checkpoint" in failed.error_message

    recorder = Recorder()
    assert run_job(message(), settings, recorder.hooks()).status == "succeeded"
    assert recorder.event("Training resumed")[2] == {"step": 1}


def test_no_learning_fails_the_quality_gate(settings):
    result = run_job(message(learning_rate_multiplier=0.0), settings, Recorder().hooks())
    assert (result.status, result.error_code) == ("failed", "quality_gate")
    before = result.eval["before"]["eval_loss"]
    assert f"held-out eval loss did not improve: {before} before training, {before} after" == result.error_message
    assert not settings.registry_dir.exists()


def test_accuracy_gate_refuses_a_model_below_it(settings):
    strict = settings.model_copy(update={"gate": "accuracy", "gate_min_accuracy": 1.0})
    result = run_job(message(n_epochs=1), strict, Recorder().hooks())
    assert (result.status, result.error_code) == ("failed", "quality_gate")
    assert "held-out accuracy" in result.error_message and "below the required 1.0" in result.error_message


def test_held_out_split_when_no_validation_file(settings):
    result = run_job(message(validation_file=None, n_epochs=1), settings, Recorder().hooks())
    assert result.status == "succeeded", result.error_message
    assert result.eval["after"]["n_eval"] == round(24 * settings.heldout_fraction)


def test_an_over_long_line_is_refused_with_its_number(settings):
    lines = (settings.files_dir / "file-train.jsonl").read_text().splitlines()
    lines[2] = json.dumps({"prompt": "profit rose " * 40, "completion": "positive"})
    (settings.files_dir / "file-long.jsonl").write_text("\n".join(lines) + "\n")
    short = settings.model_copy(update={"max_sequence_tokens": 100})
    result = run_job(message(training_file="file-long"), short, Recorder().hooks())
    assert (result.status, result.error_code) == ("failed", "invalid_training_file")
    assert result.error_message.startswith("file file-long, line 3: ")
    assert "more than the 100 a training example may have" in result.error_message


@pytest.mark.parametrize(("content", "words"), [
    ("not json at all\n", "line 1: not JSON"),
    ('{"prompt": "a", "completion": "b"}\n{"prompt": "only a prompt"}\n',
     "line 2: a line needs `messages`, or string `prompt` and `completion`"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "hi"}]}\n',
     "line 1: the last message must be the assistant's"),
    ("\n\n", "has no examples"),
    (None, "not found"),
])
def test_a_bad_training_file_fails_with_a_clear_error(settings, content, words):
    if content is not None:
        (settings.files_dir / "file-bad.jsonl").write_text(content)
    result = run_job(message(training_file="file-bad"), settings, Recorder().hooks())
    assert (result.status, result.error_code) == ("failed", "invalid_training_file")
    assert words in result.error_message


def test_a_bad_validation_file_names_it(settings):
    (settings.files_dir / "file-bad.jsonl").write_text("[1, 2]\n")
    result = run_job(message(validation_file="file-bad"), settings, Recorder().hooks())
    assert (result.status, result.error_code) == ("failed", "invalid_validation_file")
    assert result.error_message == "file file-bad, line 1: not a JSON object"


def test_target_modules_the_model_lacks_fail_the_job(settings):
    result = run_job(message("adapter", target_modules=["no_such_proj"], feedforward_modules=[]), settings,
                     Recorder().hooks())
    assert (result.status, result.error_code) == ("failed", "invalid_hyperparameters")
    assert "target_modules do not match the base model's modules" in result.error_message


def test_a_job_for_another_base_model_is_refused(settings):
    job = message().model_copy(update={"model": "other-model"})
    result = run_job(job, settings, Recorder().hooks())
    assert (result.status, result.error_code) == ("failed", "model_not_available")
    assert result.error_message == "this trainer trains 'tiny-llama', not 'other-model'"


def test_the_shipped_task_is_balanced_and_its_held_out_sentences_are_new(tmp_path):
    finsent.main([str(tmp_path / "a"), "--train", "300", "--heldout", "60"])
    finsent.main([str(tmp_path / "b"), "--train", "300", "--heldout", "60"])
    assert (tmp_path / "a" / "train.jsonl").read_bytes() == (tmp_path / "b" / "train.jsonl").read_bytes()
    sets = {}
    for name in ("train", "heldout"):
        lines = [json.loads(line)["messages"] for line in (tmp_path / "a" / f"{name}.jsonl").read_text().splitlines()]
        assert [[m["role"] for m in chat] for chat in lines] == [["system", "user", "assistant"]] * len(lines)
        labels = [chat[-1]["content"] for chat in lines]
        assert {label: labels.count(label) for label in set(labels)} == dict.fromkeys(finsent.LABELS, len(lines) // 3)
        sets[name] = {chat[1]["content"] for chat in lines}
    assert len(sets["train"]) == 300 and len(sets["heldout"]) == 60
    assert not sets["train"] & sets["heldout"]


def test_auto_hyperparameters_follow_the_data_size(settings):
    big = resolve_hyperparameters(message(n_epochs="auto", batch_size="auto"), settings, 900)
    assert (big["n_epochs"], big["batch_size"], big["learning_rate"]) == (6, 8, settings.lora_learning_rate)
    small = resolve_hyperparameters(message(n_epochs="auto", batch_size="auto", learning_rate_multiplier=0.5),
                                    settings, 40)
    assert (small["n_epochs"], small["batch_size"], small["learning_rate"]) == (20, 1, settings.lora_learning_rate / 2)
