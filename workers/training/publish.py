"""Publishing a job's output into the registry: a peft folder (lora, adapter) or a
whole model with its tokenizer (full), with `llmq-model.json` beside the weights.
Written into a temporary folder beside its place and renamed into it, so a worker
listing the registry sees a whole output or none."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from shared.training import REGISTRY_METADATA, TrainingMessage, registry_path, split_fine_tuned


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
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.publishing-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        if meta["method"] == "full":
            tokenizer.save_pretrained(tmp)
        (tmp / REGISTRY_METADATA).write_text(json.dumps(meta, indent=2) + "\n")
        # mkdtemp makes an owner-only folder; workers may run as another user.
        tmp.chmod(0o755)
        if target.exists():
            # Moved aside rather than deleted first, so `target` is missing only between two renames.
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            target.rename(old / target.name)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
