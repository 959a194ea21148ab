"""A trainer's settings (`LLMQ_*`), beside what every process reads: the base model
it fine-tunes, where jobs keep their checkpoints, the methods' base learning rates,
how "auto" hyperparameters are chosen, and the quality gate a job must pass to be
published."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field

from shared.settings import ServiceSettings, cli
from workers.settings import default_model_name


class TrainerSettings(ServiceSettings):
    # --- the base model -------------------------------------------------------
    # Local path or hub name of the base model this trainer fine-tunes.
    model: str = Field(default=".llmq/models/tiny-llama", json_schema_extra=cli("--model"))
    # The name jobs give as `model`; defaults to the last part of `model` (as workers name it).
    model_name: str | None = None
    # "auto": cuda when available, else cpu.
    device: str = "auto"

    # --- work dirs ------------------------------------------------------------
    # Per-job work dirs ({training_dir}/{job id}) with its checkpoints; on shared storage,
    # another trainer resumes a job where a dead one left it.
    training_dir: Path = Field(default=Path(".llmq/training"), json_schema_extra=cli("--training-dir"))
    # Save a checkpoint every this many optimizer steps (and when a job is stopped).
    checkpoint_steps: int = Field(default=50, ge=1)
    # Checkpoints kept per job, the newest. At least 2: the Trainer deletes older ones as soon as
    # it has written a new one, before that one is marked complete.
    checkpoints_kept: int = Field(default=2, ge=2)

    # --- hyperparameters ------------------------------------------------------
    # Base learning rates per method; a job's learning_rate_multiplier multiplies them.
    lora_learning_rate: float = Field(default=4e-3, ge=0)
    adapter_learning_rate: float = Field(default=1e-1, ge=0)
    full_learning_rate: float = Field(default=5e-4, ge=0)
    # "auto" epochs: enough passes for the job to see about this many examples, at most 20.
    auto_examples_seen: int = Field(default=5400, ge=1)
    # "auto" batch size: one per 32 training examples, between 1 and this.
    auto_batch_size_max: int = Field(default=8, ge=1)
    # Longest training example (prompt + completion + EOS), tokens; a longer line fails the
    # job naming it (never truncated). Unset: the base model's context.
    max_sequence_tokens: int | None = Field(default=None, ge=2)
    # Log progress (loss, learning rate, tokens/s, ETA) every this many optimizer steps.
    logging_steps: int = Field(default=5, ge=1)

    # --- evaluation and the quality gate --------------------------------------
    # What a job must show on its validation set to be published: a lower eval loss than
    # the base model's, or an exact-match accuracy of at least gate_min_accuracy (jobs whose
    # answers are short labels; others fall back to the eval loss).
    gate: Literal["eval_loss", "accuracy"] = "eval_loss"
    gate_min_accuracy: float = Field(default=0.6, ge=0, le=1)
    # Share of the training file held out for evaluation when a job has no validation
    # file (chosen by the job's seed, so a re-run holds out the same lines).
    heldout_fraction: float = Field(default=0.1, gt=0, lt=1)

    # --- the trainer service --------------------------------------------------
    # A running job's lease: its trainer renews it; another trainer takes the job over
    # (resuming from its last checkpoint) only once it has lapsed.
    training_lease_seconds: float = Field(default=30.0, gt=0)
    # How often the trainer writes the run's progress, events and checkpoints to the job's
    # record, renewing its lease and reading whether a cancel was asked for.
    progress_interval_seconds: float = Field(default=1.0, gt=0)
    # A job whose trainer died this many times in a row (a poison job) fails instead of starting again.
    max_attempts: int = Field(default=3, ge=1)
    # Port of the trainer's Prometheus /metrics (0: none).
    metrics_port: int = Field(default=9400, ge=0, le=65535)
    # Address /metrics listens on; where unset, LLMQ_HTTP_HOST (what deployments set for every process) is read.
    metrics_host: str = Field(default="127.0.0.1",
                              validation_alias=AliasChoices("LLMQ_METRICS_HOST", "LLMQ_HTTP_HOST"))

    @property
    def base_model_name(self) -> str:
        return self.model_name or default_model_name(self.model)

    def learning_rate(self, method: str) -> float:
        return {"lora": self.lora_learning_rate, "adapter": self.adapter_learning_rate,
                "full": self.full_learning_rate}[method]
