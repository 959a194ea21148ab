"""The `optimization.job` object and its events (`optimization.job.event`), built from
what Redis holds for the job, the same hash and event list a fine-tuning job has. Pure: no I/O."""

from __future__ import annotations

import re
import time

from shared.training import JobStatus

# `optevent-{the job's 24 hex}-{index in its events list}`, as fine-tuning's event ids.
EVENT_ID = re.compile(r"^optevent-([0-9a-f]{24})-(\d{1,9})$")
EVENT_PREFIX = "optevent"
EVENT_OBJECT = "optimization.job.event"


def _int(value: object) -> int | None:
    return int(float(value)) if value not in (None, "") else None


def job_object(job: dict[str, object]) -> dict:
    """A job's hash (decoded) as `optimization.job`: the source `model`, the `strategy` with
    every setting, `optimized_model` (its served name, once succeeded), `eval` (figures on
    held-out examples before and after) and `figures` (what the strategy did: sizes, shapes)."""
    status = str(job["status"])
    progress = job.get("progress") or None
    eta = progress.get("eta_seconds") if status == JobStatus.running.value and isinstance(progress, dict) else None
    return {
        "object": "optimization.job",
        "id": job["id"],
        "model": job["model"],
        "strategy": job["strategy"],
        "status": status,
        "optimized_model": job.get("optimized_model") if status == JobStatus.succeeded.value else None,
        "training_file": job.get("training_file") or None,
        "validation_file": job.get("validation_file") or None,
        "eval": job.get("eval") or None,
        "figures": job.get("figures") or None,
        "error": job.get("error") or None,
        "seed": _int(job["seed"]),
        "metadata": job.get("metadata") or None,
        "user_provided_suffix": job.get("suffix") or None,
        "progress": progress,
        "created_at": _int(job["created_at"]),
        "finished_at": _int(job.get("finished_at")),
        "estimated_finish": int(time.time() + float(eta)) if eta is not None else None,
    }
