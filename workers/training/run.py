"""One fine-tuning job's run, start to end, in the calling thread: read and tokenize
its files, build the model for its method, evaluate it, train with transformers'
Trainer (resuming from the job's last complete checkpoint), evaluate again, hold
the result to the quality gate and publish it to the registry. No Kafka, no Redis:
the trainer service calls `run_job` and records what it reports."""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from safetensors import SafetensorError
from transformers import PrinterCallback, Trainer, set_seed

from shared.training import Method, TrainingMessage
from workers.training import evaluate
from workers.training.checkpoints import Hooks, Reporter, drop_incomplete, latest_complete
from workers.training.data import TrainingFileError, load_file, split_heldout
from workers.training.model import load_base, resolve_device, target_error, trainable
from workers.training.publish import metadata, output_path, publish
from workers.training.settings import TrainerSettings

__all__ = ["Hooks", "JobResult", "build_trainer", "explain_hyperparameters", "remove_work_dir", "run_job"]


@dataclass
class JobResult:
    # "stopped": hooks.should_stop() ended the run (a checkpoint was saved); the service
    # knows why (a cancel: cancelled; a lost lease: another trainer resumes it).
    status: Literal["succeeded", "failed", "cancelled", "stopped"]
    error_code: str | None = None
    error_message: str | None = None
    trained_tokens: int = 0
    # {"before": {...}, "after": {...}}: eval_loss, perplexity, n_eval, accuracy (short answers).
    eval: dict = field(default_factory=dict)
    output_path: str | None = None  # the published registry folder, when succeeded
    # An optimization job's: what its strategy did, measured (parameters, shapes, size on disk).
    figures: dict = field(default_factory=dict)


class CheckpointFailed(Exception):
    """A checkpoint's save failed: a full disk is an OSError from open() and write(), a
    RuntimeError from torch.save, a SafetensorError from safetensors."""


class CheckpointingTrainer(Trainer):
    """Trainer whose failed checkpoint saves are told apart from training errors."""

    def _save_checkpoint(self, model, trial):
        try:
            return super()._save_checkpoint(model, trial)
        except (OSError, RuntimeError, SafetensorError) as exc:
            raise CheckpointFailed(str(exc)) from exc


class JobFailed(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def run_job(message: TrainingMessage, settings: TrainerSettings, hooks: Hooks) -> JobResult:
    """Runs `message`'s job to its end. A failure the job's owner can act on (bad file, quality
    gate, full disk) is a failed JobResult; anything else is raised, for the service to handle."""
    try:
        return _Run(message, settings, hooks).run()
    except TrainingFileError as exc:
        hooks.event(str(exc), "error", {"code": exc.code})
        return JobResult("failed", exc.code, str(exc))
    except JobFailed as exc:
        hooks.event(str(exc), "error", {"code": exc.code})
        return JobResult("failed", exc.code, str(exc))


def remove_work_dir(settings: TrainerSettings, job_id: str) -> None:
    """Deletes a job's checkpoints. For the service, once the job's end is recorded: until
    then a re-run (after a crash) resumes from them, and a finished one only re-publishes."""
    shutil.rmtree(Path(settings.training_dir) / job_id, ignore_errors=True)


def resolve_hyperparameters(message: TrainingMessage, settings: TrainerSettings, n_train: int) -> dict:
    """The job's hyperparameters with every "auto" replaced by what this run uses."""
    return explain_hyperparameters(message.method, settings, n_train)[0]


def explain_hyperparameters(method: Method, settings: TrainerSettings, n_train: int) -> tuple[dict, dict[str, str]]:
    """(the method's hyperparameters with every "auto" resolved, why each has its value):
    the trainer's own rules, which `llmq recommend training` shows as they are."""
    hp = method.hyperparameters.model_dump()
    why = {name: "given" for name in hp}
    if hp["batch_size"] == "auto":
        hp["batch_size"] = max(1, min(settings.auto_batch_size_max, n_train // 32))
        why["batch_size"] = (f"auto: one per 32 training examples ({n_train} // 32 = {n_train // 32}), "
                             f"between 1 and {settings.auto_batch_size_max} (LLMQ_AUTO_BATCH_SIZE_MAX)")
    if hp["n_epochs"] == "auto":
        hp["n_epochs"] = max(1, min(20, math.ceil(settings.auto_examples_seen / n_train)))
        why["n_epochs"] = (f"auto: enough passes to see about {settings.auto_examples_seen} examples "
                           f"(LLMQ_AUTO_EXAMPLES_SEEN): ceil({settings.auto_examples_seen} / {n_train}), between 1 and 20")
    if hp["learning_rate_multiplier"] == "auto":
        hp["learning_rate_multiplier"] = 1.0
        why["learning_rate_multiplier"] = "auto: 1.0"
    base = settings.learning_rate(method.type)
    hp["learning_rate"] = base * hp["learning_rate_multiplier"]
    why["learning_rate"] = (f"the {method.type} method's base rate {base:g} (LLMQ_{method.type.upper()}_LEARNING_RATE) "
                            f"x multiplier {hp['learning_rate_multiplier']:g}")
    return hp, why


def build_trainer(model, tokenizer, train: list, heldout: list, hp: dict, *, settings: TrainerSettings,
                  work_dir: Path, seed: int, device: str, hooks: Hooks) -> tuple[Trainer, Reporter]:
    """The Trainer a job runs with (its arguments from the resolved hyperparameters and the
    trainer's settings), and the callback that reports its progress and stops it."""
    from transformers import DataCollatorForSeq2Seq, TrainingArguments

    args = TrainingArguments(
        output_dir=str(work_dir), seed=seed, report_to="none", disable_tqdm=True,
        num_train_epochs=hp["n_epochs"], per_device_train_batch_size=hp["batch_size"],
        per_device_eval_batch_size=16, gradient_accumulation_steps=hp["gradient_accumulation_steps"],
        learning_rate=hp["learning_rate"], use_cpu=device == "cpu",
        # bf16 autocast on CUDA only: on CPU (even one with AMX) it measured no faster here.
        bf16=device.startswith("cuda"),
        logging_steps=settings.logging_steps, logging_first_step=True,
        eval_strategy="steps", eval_steps=settings.checkpoint_steps,
        save_strategy="steps", save_steps=settings.checkpoint_steps,
        save_total_limit=settings.checkpoints_kept,
        include_num_input_tokens_seen="non_padding", dataloader_num_workers=0)
    reporter = Reporter(hooks, work_dir)
    trainer = CheckpointingTrainer(model=model, args=args, processing_class=tokenizer, callbacks=[reporter],
                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
                      train_dataset=[x.features() for x in train], eval_dataset=[x.features() for x in heldout])
    # The Trainer prints every log dict to stdout when its progress bar is off; the
    # Reporter hands them to the service instead.
    trainer.remove_callback(PrinterCallback)
    return trainer, reporter


class _Run:
    def __init__(self, message: TrainingMessage, settings: TrainerSettings, hooks: Hooks):
        self.message, self.settings, self.hooks = message, settings, hooks
        self.work_dir = Path(settings.training_dir) / message.id
        self.device = resolve_device(settings.device)

    def run(self) -> JobResult:
        # 1) the base model and the job's data
        if self.message.model != self.settings.base_model_name:
            raise JobFailed("model_not_available", f"this trainer trains {self.settings.base_model_name!r}, "
                                                   f"not {self.message.model!r}")
        base, tokenizer = load_base(self.settings.model, self.device)
        train, heldout = self._data(tokenizer, base.config.max_position_embeddings)
        hp = resolve_hyperparameters(self.message, self.settings, len(train))
        # 2) the model to train, and its figures before training
        set_seed(self.message.seed)
        try:
            model = trainable(base, self.message.method)
        except ValueError as exc:
            if (reason := target_error(exc)) is None:
                raise
            raise JobFailed("invalid_hyperparameters", reason) from exc
        before = evaluate.figures(model, tokenizer, heldout)
        self.hooks.event(f"Evaluation before training: eval loss {before['eval_loss']}", "info", before)
        # 3) training, from the last complete checkpoint
        trainer, reporter = self._trainer(model, tokenizer, train, heldout, hp)
        self._train(trainer)
        tokens = int(trainer.state.num_input_tokens_seen)
        if reporter.stopped:
            self.hooks.event(f"Training stopped at step {trainer.state.global_step}", "info",
                             {"step": trainer.state.global_step})
            return JobResult("stopped", trained_tokens=tokens, eval={"before": before})
        # 4) figures after, the gate, publishing
        after = evaluate.figures(model, tokenizer, heldout)
        self.hooks.event(f"Evaluation after training: eval loss {after['eval_loss']}", "info", after)
        figures = {"before": before, "after": after}
        if (refusal := self._gate(before, after)) is not None:
            self.hooks.event(refusal, "error", {"code": "quality_gate"})
            return JobResult("failed", "quality_gate", refusal, tokens, figures)
        target = output_path(self.settings.registry_dir, self.message)
        meta = metadata(self.message, self.settings.base_model_name, hp, figures)
        try:
            publish(model, tokenizer, target, meta)
        except (OSError, SafetensorError) as exc:
            raise JobFailed("publish_failed", f"could not write the output to the registry: {exc}") from exc
        self.hooks.event(f"Published {self.message.fine_tuned_model}", "info", {"path": str(target)})
        return JobResult("succeeded", trained_tokens=tokens, eval=figures, output_path=str(target))

    def _data(self, tokenizer, context: int):
        max_tokens = self.settings.max_sequence_tokens or context
        files = self.settings.files_dir
        train = load_file(files, self.message.training_file, tokenizer, max_tokens, "invalid_training_file")
        if self.message.validation_file is None:
            return split_heldout(train, self.settings.heldout_fraction, self.message.seed)
        return train, load_file(files, self.message.validation_file, tokenizer, max_tokens, "invalid_validation_file")

    def _trainer(self, model, tokenizer, train, heldout, hp):
        return build_trainer(model, tokenizer, train, heldout, hp, settings=self.settings, work_dir=self.work_dir,
                             seed=self.message.seed, device=self.device, hooks=self.hooks)

    def _train(self, trainer) -> None:
        dropped = drop_incomplete(self.work_dir)
        if dropped:
            self.hooks.event(f"Skipped incomplete checkpoints at steps {dropped}", "warn", {"steps": dropped})
        resume = latest_complete(self.work_dir)
        start = int(resume.name.split("-")[1]) if resume else 0
        self.hooks.event("Training resumed" if resume else "Training started", "info", {"step": start})
        try:
            trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        except CheckpointFailed as exc:
            # A save cut short (disk full): its checkpoint is never marked complete, so the
            # previous one stays the one a re-run resumes from.
            raise JobFailed("checkpoint_failed", f"could not save a checkpoint: {exc.__cause__}") from exc

    def _gate(self, before: dict, after: dict) -> str | None:
        """Why the trained model may not be published, or None."""
        if self.settings.gate == "accuracy":
            if "accuracy" in after:
                if after["accuracy"] >= self.settings.gate_min_accuracy:
                    return None
                return (f"held-out accuracy {after['accuracy']} is below the required "
                        f"{self.settings.gate_min_accuracy} (before training: {before['accuracy']})")
            self.hooks.event("answers are too long for exact-match accuracy; gating on eval loss", "warn", {})
        if after["eval_loss"] < before["eval_loss"]:
            return None
        return (f"held-out eval loss did not improve: {before['eval_loss']} before training, "
                f"{after['eval_loss']} after")

