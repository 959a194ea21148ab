"""The wire contracts: what clients send over HTTP, the versioned Kafka request
message, and the request record a client reads back.

Every model here is pydantic; the Kafka message's JSON Schema is published at
shared/schemas/request-v1.schema.json (regenerate: `make schema`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StringConstraints,
    Tag,
    ValidationError,
    model_validator,
)

REQUEST_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"
RequestId = Annotated[str, StringConstraints(pattern=REQUEST_ID_PATTERN)]
SCHEMA_VERSION = 1
SCHEMA_PATH = Path(__file__).parent / "schemas" / f"request-v{SCHEMA_VERSION}.schema.json"

def _whole_numbers(data, fields: tuple[str, ...]):
    """JSON has one number type: 4.0 is the integer 4 (JSON Schema agrees), so integral
    floats in these integer fields become ints; strict validation then still refuses
    "4", true and 4.5. (A model-level hook rather than a field validator, which would
    make pydantic write the fields' bounds into the JSON Schema as unknown keywords.)"""
    if isinstance(data, dict) and any(isinstance(data.get(f), float) for f in fields):
        data = dict(data)
        for f in fields:
            value = data.get(f)
            if isinstance(value, float) and value.is_integer():
                data[f] = int(value)
    return data

# Bounds that hold for every deployment; configurable limits (prompt size,
# max_tokens) are checked against Settings by the gateway.
MAX_STOP_SEQUENCES = 8
MAX_METADATA_ITEMS = 16
MAX_WEBHOOK_URL_CHARS = 2048

# The events of a request its `webhook` may get: when a worker starts it, and once it
# is final (any status). Replicate's streaming `output` event is not offered (a filter
# naming it is refused, never ignored): the token stream (SSE) serves that need.
WebhookEvent = Literal["start", "completed"]
DEFAULT_WEBHOOK_EVENTS: tuple[str, ...] = ("start", "completed")

# Which of a worker's two queues a request waits in: interactive requests (HTTP and
# OpenAI calls) start before bulk ones (batch lines, work marked low priority). On
# Kafka the lane is the topic a request is produced to, not a message field.
Lane = Literal["interactive", "bulk"]


class Status(str, Enum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"
    expired = "expired"

    @property
    def is_final(self) -> bool:
        return self not in (Status.queued, Status.running)


FINAL_STATUSES = frozenset(s.value for s in Status if s.is_final)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str


class PromptInput(_Strict):
    prompt: str


class ChatInput(_Strict):
    messages: list[ChatMessage] = Field(min_length=1)


def _input_kind(value) -> str | None:
    """Which input this is, by its key, so an error names what is wrong with that kind
    rather than listing how the body fails every kind."""
    if isinstance(value, dict):
        return "messages" if "messages" in value else "prompt" if "prompt" in value else None
    return {PromptInput: "prompt", ChatInput: "messages"}.get(type(value))


_INPUT_KINDS = ("prompt", "messages")
Input = Annotated[
    Annotated[PromptInput, Tag("prompt")] | Annotated[ChatInput, Tag("messages")],
    Discriminator(_input_kind, custom_error_type="input_kind",
                  custom_error_message="give `prompt` (a string) or `messages` (a list of {role, content})"),
]


class Params(_Strict):
    max_tokens: int = Field(default=256, ge=1, description="Most tokens to generate.")
    temperature: float = Field(default=1.0, ge=0.0, le=5.0, description="0 means greedy decoding.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0, le=1_000_000, description="0 disables top-k filtering.")
    stop: list[Annotated[str, StringConstraints(min_length=1)]] = Field(
        default_factory=list, max_length=MAX_STOP_SEQUENCES, description="Generation ends before any of these strings."
    )
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1, description="Makes sampling repeatable.")

    @model_validator(mode="before")
    @classmethod
    def _normalise(cls, data):
        if isinstance(data, dict) and isinstance(data.get("stop"), str):
            data = {**data, "stop": [data["stop"]]}
        return _whole_numbers(data, ("max_tokens", "top_k", "seed"))


class RequestSpec(_Strict):
    """What to generate: shared by the HTTP body and the Kafka message."""

    model: str | None = Field(default=None, max_length=256, description="Omitted: the worker's default model.")
    adapter: str | None = Field(default=None, max_length=256, description="LoRA adapter name.")
    input: Input
    params: Params = Field(default_factory=Params)
    priority: int | None = Field(default=None, ge=-1000, le=1000, description="Lower runs first where supported.")
    # strict=False: RFC 3339 strings must parse also after the model-level hooks
    # hand pydantic a Python dict (strict Python mode takes only datetime objects).
    # Aware: RFC 3339 requires an offset, and a deadline without one would mean a different
    # instant on each machine.
    deadline: AwareDatetime | None = Field(default=None, strict=False,
                                           description="RFC 3339 with an offset; not started by then means "
                                                       "`expired`. One already past is refused.")
    metadata: dict[Annotated[str, StringConstraints(max_length=64)], Annotated[str, StringConstraints(max_length=512)]] = Field(
        default_factory=dict, max_length=MAX_METADATA_ITEMS
    )
    # Only the URL's shape is checked here; where it may point (no loopback, private or
    # link-local address) needs DNS, so the gateway checks it at submit and the webhook
    # sender again at each delivery.
    webhook: str | None = Field(default=None, max_length=MAX_WEBHOOK_URL_CHARS,
                                pattern=r"^https?://[^\s/?#@]+([/?#]\S*)?$",
                                description="http(s) URL that gets this request's events, signed "
                                            "(Standard Webhooks). A host that doesn't resolve to public "
                                            "addresses only is refused (422), unless the deployment allows it.")
    webhook_events_filter: list[WebhookEvent] | None = Field(
        default=None, min_length=1, max_length=2,
        description="Which events reach `webhook`: `start` (a worker started it), `completed` (it is "
                    "final, whatever its status). Omitted: both.")

    @model_validator(mode="before")
    @classmethod
    def _priority_is_whole(cls, data):
        return _whole_numbers(data, ("priority",))

    @property
    def webhook_events(self) -> frozenset[str]:
        """The events to deliver (none without a webhook)."""
        if self.webhook is None:
            return frozenset()
        return frozenset(self.webhook_events_filter or DEFAULT_WEBHOOK_EVENTS)

    def prompt_chars(self) -> int:
        if isinstance(self.input, PromptInput):
            return len(self.input.prompt)
        return sum(len(m.content) for m in self.input.messages)

    def over_limits(self, max_prompt_chars: int, max_tokens: int) -> LimitError | None:
        """How this request is over a deployment's limits (LLMQ_MAX_PROMPT_CHARS,
        LLMQ_MAX_TOKENS_LIMIT), or None. The same words over HTTP and on Kafka."""
        if self.prompt_chars() > max_prompt_chars:
            field = "input.prompt" if isinstance(self.input, PromptInput) else "input.messages"
            return LimitError("prompt_too_large", f"the prompt is over the limit of {max_prompt_chars} characters",
                              field)
        if self.params.max_tokens > max_tokens:
            return LimitError("invalid_request", f"params.max_tokens: must be at most {max_tokens}",
                              "params.max_tokens")
        return None


@dataclass(frozen=True)
class LimitError:
    type: str  # prompt_too_large | invalid_request
    message: str
    field: str


class SubmitRequest(RequestSpec):
    """Body of `POST /v1/requests`."""

    id: RequestId | None = Field(default=None, description="Omitted: the gateway makes one. Chosen: it must not "
                                                           "be in use (409 `id_in_use`).")
    lane: Lane = Field(default="interactive", description="`bulk`: low priority; interactive requests overtake "
                                                          "it, and it runs beside them on a bounded share.")


class RequestMessage(RequestSpec):
    """Kafka request message, version 1. Key: the id. Headers: traceparent, content-type."""

    model_config = ConfigDict(extra="forbid", strict=True, title="llmq request message v1")

    v: Literal[1] = Field(description="Schema version.")
    id: RequestId = Field(description="Chosen by the producer; the record and result live under it.")
    reply_topic: str | None = Field(default=None, max_length=249, description="If set, the result is also produced here.")
    tenant: str | None = Field(default=None, max_length=64,
                               description="Name of the API key that may read the result over HTTP.")
    submitted_at: datetime | None = Field(default=None, strict=False)

    def to_bytes(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()


class MessageError(ValueError):
    """A request message that cannot be served: bad bytes, JSON or schema."""


def parse_message(value: bytes | None) -> RequestMessage:
    if value is None:
        raise MessageError("empty message")
    try:
        return RequestMessage.model_validate_json(value)
    except ValidationError as exc:
        where, message = describe_error(exc.errors()[0])
        raise MessageError(f"{where or 'message'}: {message}") from exc


def describe_error(error: dict) -> tuple[str, str]:
    """(field, message) of one pydantic error, the field as a client wrote it:
    `input.messages.0.role`, without the input kind pydantic puts in the path."""
    loc = list(error["loc"])
    if len(loc) > 1 and loc[0] == "input" and loc[1] in _INPUT_KINDS:
        del loc[1]
    return ".".join(map(str, loc)), error["msg"]


def message_json_schema() -> dict:
    schema = RequestMessage.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = f"https://llmq.dev/schemas/request-v{SCHEMA_VERSION}.schema.json"
    return schema


def write_message_schema(path: Path = SCHEMA_PATH) -> None:
    path.write_text(json.dumps(message_json_schema(), indent=2, sort_keys=True) + "\n")


# ---- what clients read back ------------------------------------------------


class Output(BaseModel):
    text: str
    finish_reason: Literal["stop", "length", "error", "cancelled"] | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Timings(BaseModel):
    submitted_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    queue_seconds: float | None = Field(default=None, description="Submit to start of work.")
    run_seconds: float | None = Field(default=None, description="Start of work to finish.")
    total_seconds: float | None = Field(default=None, description="Submit to finish.")


class ErrorDetail(BaseModel):
    type: str
    message: str
    field: str | None = None


class WebhookDeliveries(BaseModel):
    """How a request's webhook deliveries went."""

    url: str
    events: list[WebhookEvent] = Field(description="The events it gets (`webhook_events_filter`).")
    attempts: int = Field(default=0, description="POSTs made, over all its events.")
    last_status_code: int | None = Field(default=None, description="The receiver's last answer (none: no answer).")
    last_error: str | None = Field(default=None, description="Why the last failed attempt failed.")
    delivered: list[WebhookEvent] = Field(default_factory=list, description="Events the receiver acknowledged (2xx).")
    given_up: list[WebhookEvent] = Field(default_factory=list,
                                         description="Events given up (to the webhook dead-letter topic).")


class RequestView(BaseModel):
    """A request as `GET /v1/requests/{id}` shows it."""

    id: str
    status: Status
    model: str | None = None
    adapter: str | None = None
    output: Output | None = None
    usage: Usage | None = None
    timings: Timings
    error: ErrorDetail | None = None
    attempts: int = 0
    cache_hit: bool = Field(default=False, description="Answered from the result cache: the output and usage of "
                                                        "an earlier identical deterministic request; no worker ran it.")
    lane: Lane = "interactive"
    metadata: dict[str, str] = Field(default_factory=dict)
    webhook: WebhookDeliveries | None = None
    # The API key name that owns it; never shown, used to answer 404 to other keys.
    tenant: str | None = Field(default=None, exclude=True)


class Accepted(BaseModel):
    """Answer to `POST /v1/requests`."""

    id: str
    status: Status
    status_url: str


class ModelCard(BaseModel):
    """One served model, in OpenAI's `model` shape."""

    id: str
    object: Literal["model"] = "model"
    created: int = Field(description="When a worker first registered it (Unix seconds).")
    owned_by: str = "llmq"


class ModelList(BaseModel):
    """Answer to `GET /v1/models`, in OpenAI's shape: the models the workers serve."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    error: ErrorDetail


if __name__ == "__main__":
    write_message_schema()
    print(SCHEMA_PATH)
