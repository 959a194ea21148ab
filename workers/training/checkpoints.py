"""A job's checkpoints in its work dir, and the Trainer callback that reports a run to
the service: progress, events, checkpoints (each marked complete once fully written,
so a half-written one is never resumed from) and stopping when the service asks."""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from transformers import TrainerCallback

COMPLETE = "llmq-complete"  # written into a checkpoint after the Trainer's save returned
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")  # the Trainer's checkpoint folder names


@dataclass
class Hooks:
    """How a run reports to the service; all called from the training thread."""

    # Every logging step: step, total_steps, epoch, train_loss, eval_loss (when evaluated),
    # learning_rate, tokens_per_second, eta_seconds.
    progress: Callable[[dict], None]
    # (message, level "info" | "warn" | "error", data): status-type events.
    event: Callable[[str, str, dict], None]
    # {"step", "path", "metrics": {"train_loss", ...}} once a checkpoint is fully written.
    checkpoint: Callable[[dict], None]
    # Checked after every optimizer step: true stops the run (cancel asked, or lease lost).
    should_stop: Callable[[], bool]


def checkpoints(work_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every checkpoint folder, oldest first, complete or not."""
    if not work_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in work_dir.iterdir() if (m := CHECKPOINT.match(p.name)) and p.is_dir()]
    return sorted(found)


def latest_complete(work_dir: Path) -> Path | None:
    done = [path for _, path in checkpoints(work_dir) if (path / COMPLETE).exists()]
    return done[-1] if done else None


def drop_incomplete(work_dir: Path) -> list[int]:
    """Deletes checkpoints never marked complete (a save cut short by a crash or a full disk),
    so the Trainer neither resumes from one nor counts it among those it keeps; their steps."""
    dropped = []
    for step, path in checkpoints(work_dir):
        if not (path / COMPLETE).exists():
            shutil.rmtree(path, ignore_errors=True)
            dropped.append(step)
    return dropped


class Reporter(TrainerCallback):
    """Turns the Trainer's steps, logs and saves into the service's hooks."""

    def __init__(self, hooks: Hooks, work_dir: Path):
        self.hooks, self.work_dir = hooks, work_dir
        self.stopped = False
        self.last_metrics: dict = {}
        self._clock: tuple[float, int, int] | None = None  # (time, step, tokens) at the run's start

    def on_train_begin(self, args, state, control, **kwargs):
        self._clock = (time.monotonic(), state.global_step, state.num_input_tokens_seen)

    def on_step_end(self, args, state, control, **kwargs):
        if not self.stopped and self.hooks.should_stop():
            self.stopped = True
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "eval_loss" in logs:
            self.last_metrics["eval_loss"] = round(logs["eval_loss"], 4)
            self.hooks.event(f"Evaluation at step {state.global_step}: eval loss {logs['eval_loss']:.4f}",
                             "info", {"step": state.global_step, "eval_loss": logs["eval_loss"]})
        if "loss" not in logs:
            return
        self.last_metrics["train_loss"] = round(logs["loss"], 4)
        self.hooks.progress({"step": state.global_step, "total_steps": state.max_steps,
                             "epoch": round(state.epoch or 0.0, 3), **self.last_metrics,
                             "learning_rate": logs.get("learning_rate"), **self._rates(state)})

    def _rates(self, state) -> dict:
        started, step0, tokens0 = self._clock or (time.monotonic(), 0, 0)
        elapsed = max(time.monotonic() - started, 1e-6)
        steps = state.global_step - step0
        eta = (state.max_steps - state.global_step) * elapsed / steps if steps else None
        return {"tokens_per_second": round((state.num_input_tokens_seen - tokens0) / elapsed, 1),
                "eta_seconds": round(eta, 1) if eta is not None else None}

    def on_save(self, args, state, control, **kwargs):
        path = self.work_dir / f"checkpoint-{state.global_step}"
        (path / COMPLETE).write_text(f"{state.global_step}\n")
        self.hooks.event(f"Checkpoint saved at step {state.global_step}", "info", {"step": state.global_step})
        self.hooks.checkpoint({"step": state.global_step, "path": str(path), "metrics": dict(self.last_metrics)})
