"""The engine interface every backend implements.

The worker hands an engine a batch of requests and gets one result per
request back, in order. A request the engine cannot serve (say, a prompt
longer than the model's context) gets a result with `error` set; it never
fails the other requests of its batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from shared.schema import ChatMessage, Params


class EngineError(RuntimeError):
    """The engine cannot start or has died: the worker process stops."""


@dataclass
class GenerationRequest:
    request_id: str
    params: Params
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    adapter: str | None = None


@dataclass
class GenerationResult:
    request_id: str
    text: str = ""
    finish_reason: str | None = None  # "stop" | "length" | "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None  # set: this request failed, with this reason
    first_token_at: float | None = None  # time.time() when its first token was chosen
    finished_at: float | None = None  # time.time() when its last token was chosen


class Engine(Protocol):
    #: The name clients pass as `model` (None in a request means this one).
    model_name: str

    async def start(self) -> None:
        """Load weights and warm up; raise EngineError if that fails."""

    async def generate(self, batch: list[GenerationRequest]) -> list[GenerationResult]:
        """Run a batch; one result per request, same order."""

    async def close(self) -> None:
        """Free what start() took. Idempotent."""
