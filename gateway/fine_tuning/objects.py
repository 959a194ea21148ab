"""OpenAI's fine-tuning objects (`fine_tuning.job`, `fine_tuning.job.event`,
`fine_tuning.job.checkpoint`) built from what Redis holds, and the ids of events and
checkpoints, which name their job and their place in its list. Pure: no I/O."""

from __future__ import annotations

import re
import time

from shared.training import JobStatus

# `ftevent-{the job's 24 hex}-{index in its events list}`: a cursor (`after`) that is
# also an id, so a page of events is one LRANGE and another job's event id is refused.
EVENT_ID = re.compile(r"^ftevent-([0-9a-f]{24})-(\d{1,9})$")
CHECKPOINT_ID = re.compile(r"^ftckpt-([0-9a-f]{24})-(\d{1,9})$")
ORGANIZATION = "llmq"  # organization_id with auth off (with auth on: the API key's name)
# OpenAI's three hyperparameters, shown at the job's top level (the method's own sit under `method`).
OPENAI_HYPERPARAMETERS = ("n_epochs", "batch_size", "learning_rate_multiplier")


def _job_hex(job_id: str) -> str:
    return job_id.partition("-")[2]  # ftjob-<hex>, optjob-<hex>


def event_id(job_id: str, index: int, prefix: str = "ftevent") -> str:
    return f"{prefix}-{_job_hex(job_id)}-{index}"


def checkpoint_id(job_id: str, index: int) -> str:
    return f"ftckpt-{_job_hex(job_id)}-{index}"


def cursor_index(pattern: re.Pattern, job_id: str, cursor: str) -> int | None:
    """The list index an event or checkpoint id names, if it is one of this job's."""
    found = pattern.match(cursor)
    if found is None or found.group(1) != _job_hex(job_id):
        return None
    return int(found.group(2))


def _int(value: object) -> int | None:
    return int(float(value)) if value not in (None, "") else None


def job_object(job: dict[str, object]) -> dict:
    """A job's hash (decoded) as OpenAI's `fine_tuning.job`, plus llmq's `progress`
    (the trainer's last step: step, total_steps, epoch, losses, learning rate,
    tokens/s, eta_seconds) and `eval` (quality figures before and after training)."""
    status = str(job["status"])
    method = job.get("method") or {"type": "lora"}
    hyperparameters = job.get("hyperparameters") or {}
    progress = job.get("progress") or None
    running = status == JobStatus.running.value
    eta = progress.get("eta_seconds") if running and isinstance(progress, dict) else None
    tenant = job.get("tenant") or None
    return {
        "id": job["id"],
        "object": "fine_tuning.job",
        "created_at": _int(job["created_at"]),
        "finished_at": _int(job.get("finished_at")),
        "model": job["model"],
        # OpenAI names the output only once it exists.
        "fine_tuned_model": job.get("fine_tuned_model") if status == JobStatus.succeeded.value else None,
        "organization_id": tenant or ORGANIZATION,
        "result_files": [],
        "status": status,
        "training_file": job["training_file"],
        "validation_file": job.get("validation_file") or None,
        "hyperparameters": {name: hyperparameters.get(name, "auto") for name in OPENAI_HYPERPARAMETERS},
        "method": {"type": method["type"], method["type"]: {"hyperparameters": hyperparameters}},
        "trained_tokens": _int(job.get("trained_tokens")),
        "error": job.get("error") or None,
        "seed": _int(job["seed"]),
        "estimated_finish": int(time.time() + float(eta)) if eta is not None else None,
        "integrations": [],
        "metadata": job.get("metadata") or None,
        "user_provided_suffix": job.get("suffix") or None,
        "progress": progress,
        "eval": job.get("eval") or None,
    }


def event_object(job_id: str, event: dict, prefix: str = "ftevent", object_name: str = "fine_tuning.job.event") -> dict:
    """One of TrainingStore.events() (with its index `n`) as OpenAI's `fine_tuning.job.event`
    (or another kind of job's event, named by `prefix` and `object_name`)."""
    return {"id": event_id(job_id, event["n"], prefix), "object": object_name,
            "created_at": int(event["created_at"]), "level": event.get("level", "info"),
            "message": event["message"], "type": event.get("type", "message"), "data": event.get("data") or {}}


def checkpoint_object(job: dict[str, object], index: int, checkpoint: dict) -> dict:
    """A trainer's checkpoint ({step, path, metrics}) as OpenAI's `fine_tuning.job.checkpoint`.
    Its model name is OpenAI's form: the output's name and `:ckpt-step-{step}`."""
    step = int(checkpoint["step"])
    metrics = {"step": float(step), **(checkpoint.get("metrics") or {})}
    return {"id": checkpoint_id(str(job["id"]), index), "object": "fine_tuning.job.checkpoint",
            "created_at": _int(checkpoint.get("created_at")) or _int(job["created_at"]),
            "fine_tuned_model_checkpoint": f"{job.get('fine_tuned_model')}:ckpt-step-{step}",
            "step_number": step, "metrics": metrics, "fine_tuning_job_id": job["id"]}
