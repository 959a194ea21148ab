"""The engine interface every backend implements.

An engine schedules per decoding step (continuous batching): the worker hands
it requests one at a time as they arrive, and reads each request's outputs as
they come, the way vLLM's `AsyncLLM.generate` does:

    async for output in engine.generate(request):
        ...  # output.delta: text new since the last output
    # the last output carries output.result: the request is done

A request the engine cannot serve (say, a prompt longer than the model's
context) ends with a result whose `error` is set; it never disturbs the other
requests running beside it. `abort(request_id)` stops a running request at the
next step boundary; its last output has finish_reason "abort". An
`EngineError` means the engine itself is dead: the worker process stops.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
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
    priority: int = 0  # lower runs first, where the engine supports it
    # W3C trace headers of the request's span, for engines that trace on their own (vLLM).
    trace_headers: dict[str, str] = field(default_factory=dict)


@dataclass
class GenerationResult:
    request_id: str
    text: str = ""
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None  # set: this request failed, with this reason
    first_token_at: float | None = None  # time.time() when its first token was chosen
    finished_at: float | None = None  # time.time() when its last token was chosen


@dataclass
class GenerationOutput:
    """One step's news about a request."""

    request_id: str
    delta: str = ""  # text new since the previous output (may be "" while a character is incomplete)
    completion_tokens: int = 0  # tokens generated so far
    result: GenerationResult | None = None  # set on the last output only

    @property
    def finished(self) -> bool:
        return self.result is not None


class Engine(Protocol):
    #: The name clients pass as `model` (None in a request means this one).
    model_name: str
    #: How many requests it decodes at once; the worker holds about this many (plus
    #: a small waiting room) and pauses its Kafka fetch while it has them.
    max_running: int
    #: How many are in its running batch now (the rest it holds wait for a slot).
    running: int

    async def start(self) -> None:
        """Load weights and warm up; raise EngineError if that fails."""

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        """Run one request beside the others; yields deltas, the last output has `result`.

        Closing the iterator early (the caller was cancelled) aborts the request.
        """

    async def abort(self, request_id: str) -> None:
        """Stop a request at the next step boundary. Unknown or finished ids are ignored."""

    async def close(self) -> None:
        """Free what start() took. Idempotent."""


async def collect(engine: Engine, request: GenerationRequest) -> GenerationResult:
    """Run one request to its end and return only its result (tests, benchmarks)."""
    async for output in engine.generate(request):
        if output.result is not None:
            return output.result
    raise EngineError(f"the engine ended request {request.request_id!r} without a result")
