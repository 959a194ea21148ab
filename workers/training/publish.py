"""Publishing a job's output into the registry: a peft folder (lora, adapter) or a
whole model with its tokenizer (full), with `llmq-model.json` beside the weights.
Put in place atomically (workers/folders.py), so a worker listing the registry sees
a whole output or none."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from shared.training import REGISTRY_METADATA, TrainingMessage, registry_path, split_fine_tuned
from workers.folders import write_in_place


def output_path(registry_dir: Path, message: TrainingMessage) -> Path:
    named = split_fine_tuned(message.fine_tuned_model)
    if named is None:
        raise ValueError(f"{message.fine_tuned_model!r} is not a fine-tuned model's name")
    return registry_path(Path(registry_dir), message.method.type, named[1])


def metadata(message: TrainingMessage, base_name: str, hyperparameters: dict, eval_figures: dict) -> dict:
    return {"job_id": message.id, "model": message.fine_tuned_model, "base_model": base_name,
            "method": message.method.type, "hyperparameters": hyperparameters, "eval": eval_figures,
            "created_at": int(time.time())}


def publish(model: Any, tokenizer: Any, target: Path, meta: dict) -> Path:
    """Saves the model (peft: the adapter alone) and its metadata at `target`, atomically.
    A re-run of the same job replaces its own earlier output; OSError when the disk is full."""
    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        if meta["method"] == "full":
            tokenizer.save_pretrained(folder)
        (folder / REGISTRY_METADATA).write_text(json.dumps(meta, indent=2) + "\n")

    return write_in_place(target, write, "publishing")
