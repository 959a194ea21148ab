"""A request record's hash fields: what a new record holds, and how values are encoded."""

from __future__ import annotations

import json
from collections.abc import Mapping

from shared.schema import Lane, RequestSpec, Status


def encode(fields: Mapping[str, object]) -> dict[str, str]:
    """Hash fields as Redis stores them: None left out, dicts as JSON, the rest as str."""
    return {
        key: json.dumps(value) if isinstance(value, dict) else str(value)
        for key, value in fields.items()
        if value is not None
    }


def flat(fields: Mapping[str, object]) -> str:
    """Fields as the flat JSON array [k1, v1, k2, v2, ...] the Lua scripts take."""
    return json.dumps([part for pair in encode(fields).items() for part in pair])


def base_fields(request_id: str, spec: RequestSpec, submitted_at: float, source: str,
                tenant: str | None = None, lane: Lane = "interactive") -> dict[str, object]:
    """What a new record holds before any worker touches it."""
    return {
        "tenant": tenant,
        "id": request_id,
        "status": Status.queued.value,
        "model": spec.model,
        "adapter": spec.adapter,
        "submitted_at": submitted_at,
        "metadata": spec.metadata or None,
        "webhook": spec.webhook,
        # The events its webhook gets, space-separated, so whichever process ends the
        # request (a worker, or a gateway cancelling it) knows which to queue.
        "webhook_events": " ".join(sorted(spec.webhook_events)) or None,
        "source": source,
        "lane": lane,
        "attempts": 0,
    }
