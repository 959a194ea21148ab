"""OpenAI's Batch object and the lines of a batch's output and error files, built
from what Redis holds (a batch's hash, its lines' records). Pure: no I/O."""

from __future__ import annotations

import json
import re

from gateway.openai_compat import OpenAICall, completion_response, view_error
from shared.schema import Status
from shared.store.view import view_of, webhook_deliveries

BATCH_ID = re.compile(r"^batch_[0-9a-f]{32}$")
TIMESTAMPS = ("in_progress_at", "expires_at", "finalizing_at", "completed_at", "failed_at", "expired_at",
              "cancelling_at", "cancelled_at")
# What the error file says of a line that never ran, by how its batch ended.
NOT_RUN = {
    "batch_cancelled": "The batch was cancelled before this request ran.",
    "batch_expired": "This request could not be executed before the completion window expired.",
}


def _int(value: str | None) -> int | None:
    return int(float(value)) if value else None


def batch_object(batch: dict[str, str]) -> dict:
    """A batch's hash as OpenAI's Batch object. `request_counts` has llmq's `cancelled`
    beside OpenAI's three, so completed + failed + cancelled = total; `webhook` (llmq's,
    null without one) is how its webhook's deliveries went, as on a request."""
    counts = {name: int(batch.get(name, 0)) for name in ("completed", "failed", "cancelled")}
    errors = json.loads(batch["errors"]) if batch.get("errors") else None
    return {
        "id": batch["id"],
        "object": "batch",
        "endpoint": batch["endpoint"],
        "model": batch.get("model"),
        "errors": {"object": "list", "data": errors} if errors else None,
        "input_file_id": batch["input_file_id"],
        "completion_window": batch["completion_window"],
        "status": batch["status"],
        "output_file_id": batch.get("output_file_id"),
        "error_file_id": batch.get("error_file_id"),
        "created_at": _int(batch["created_at"]),
        **{name: _int(batch.get(name)) for name in TIMESTAMPS},
        "request_counts": {"total": int(batch.get("total", 0)), **counts},
        "metadata": json.loads(batch["metadata"]) if batch.get("metadata") else None,
        "webhook": hook.model_dump() if (hook := webhook_deliveries(batch)) else None,
    }


def result_line(call: OpenAICall, line_id: str, custom_id: str, record: dict[str, str]) -> tuple[bool, bytes]:
    """(whether it goes to the output file, not the error file; its JSONL line) for one
    line of a batch: the endpoint's answer (or its error, as the endpoint would have sent
    it) under `response`; a line that never ran has `error` instead."""
    response = error = None
    ok = False
    if not record:
        error = {"code": "record_expired", "message": "the request's record expired before the batch ended"}
    else:
        view = view_of(record)
        refused = view_error(view) if view.status.is_final else None
        if view.status is Status.succeeded:
            ok = True
            response = {"status_code": 200, "request_id": line_id, "body": completion_response(call, line_id, view)}
        elif view.error is not None and view.error.type in NOT_RUN:
            error = {"code": view.error.type, "message": NOT_RUN[view.error.type]}
        elif refused is not None:
            response = {"status_code": refused.status, "request_id": line_id, "body": refused.body()}
        else:
            error = {"code": "unfinished", "message": f"the request was still {view.status.value}"}
    line = {"id": f"batch_req_{line_id}", "custom_id": custom_id, "response": response, "error": error}
    return ok, json.dumps(line, separators=(",", ":")).encode() + b"\n"
