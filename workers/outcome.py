"""How a request ended, as a worker reports it: the fields its result writes."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from shared.schema import Status


@dataclass
class Outcome:
    """How one request ended, as a worker reports it."""

    request_id: str
    status: Status
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error_type: str | None = None
    error_message: str | None = None
    model: str | None = None  # the model that served it (set once an engine ran it)
    finished_at: float = field(default_factory=time.time)

    def fields(self) -> dict[str, object]:
        out: dict[str, object] = {
            "status": self.status.value,
            "finished_at": self.finished_at,
            "text": self.text,
            "finish_reason": self.finish_reason,
            "error_type": self.error_type,
            "error_message": self.error_message,
        }
        if self.model is not None:
            out["model"] = self.model
        if self.status is Status.succeeded:
            out["prompt_tokens"] = self.prompt_tokens
            out["completion_tokens"] = self.completion_tokens
        return out
