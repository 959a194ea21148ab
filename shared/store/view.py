"""A request record as clients see it (`RequestView`, the body of `GET /v1/requests/{id}`)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime, timezone

from shared.schema import ErrorDetail, Output, RequestView, Status, Timings, Usage, WebhookDeliveries


def _ts(value: str | None) -> float | None:
    return float(value) if value else None


def _dt(value: float | None) -> datetime | None:
    return datetime.fromtimestamp(value, tz=timezone.utc) if value is not None else None


def _seconds(start: float | None, end: float | None) -> float | None:
    return round(end - start, 6) if start is not None and end is not None else None


def view_of(record: Mapping[str, str]) -> RequestView:
    status = Status(record["status"])
    submitted, started, finished = (_ts(record.get(k)) for k in ("submitted_at", "started_at", "finished_at"))
    output = usage = error = None
    if status is Status.succeeded:
        output = Output(text=record.get("text", ""), finish_reason=record.get("finish_reason"))
        prompt, completion = int(record.get("prompt_tokens", 0)), int(record.get("completion_tokens", 0))
        usage = Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)
    elif status is Status.running and record.get("text"):
        output = Output(text=record["text"])  # the text so far
    if record.get("error_type"):
        error = ErrorDetail(type=record["error_type"], message=record.get("error_message", ""))
    return RequestView(
        id=record["id"],
        status=status,
        model=record.get("model"),
        adapter=record.get("adapter"),
        output=output,
        usage=usage,
        error=error,
        attempts=int(record.get("attempts", 0)),
        cache_hit=record.get("cache_hit") == "1",
        lane=record.get("lane", "interactive"),
        tenant=record.get("tenant"),
        metadata=json.loads(record["metadata"]) if record.get("metadata") else {},
        webhook=webhook_deliveries(record),
        timings=Timings(
            submitted_at=_dt(submitted),
            started_at=_dt(started),
            finished_at=_dt(finished),
            queue_seconds=_seconds(submitted, started),
            run_seconds=_seconds(started, finished),
            total_seconds=_seconds(submitted, finished),
        ),
    )


_WEBHOOK_EVENTS = ("start", "completed")


def webhook_deliveries(record: Mapping[str, str]) -> WebhookDeliveries | None:
    """How the webhook of a request's record (or a batch's hash: the same fields) went."""
    if not record.get("webhook"):
        return None
    ended = {event: record.get(f"webhook_{event}") for event in _WEBHOOK_EVENTS}
    code = record.get("webhook_status_code")
    return WebhookDeliveries(
        url=record["webhook"],
        events=[e for e in _WEBHOOK_EVENTS if e in record.get("webhook_events", "").split()],
        attempts=int(record.get("webhook_attempts", 0)),
        last_status_code=int(code) if code else None,
        last_error=record.get("webhook_error") or None,
        delivered=[e for e, state in ended.items() if state == "delivered"],
        given_up=[e for e, state in ended.items() if state == "given_up"],
    )
