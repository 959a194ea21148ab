"""OpenAI's `POST /v1/chat/completions` and `POST /v1/completions`, translated to and from
llmq's own request spec and record. Pure: no I/O; the gateway's handlers call it.

What OpenAI defines and llmq cannot do is refused by name, unless it carries its neutral
value: SDKs and frameworks that always send defaults keep working, and nothing that would
change the output is ignored.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from shared.schema import LimitError, RequestSpec, RequestView, Status, Usage, describe_error
from shared.training import split_fine_tuned

Kind = Literal["chat", "completion"]
SSE_DONE = b"data: [DONE]\n\n"


class OpenAIError(Exception):
    """An error in OpenAI's wire shape; `headers` go on the HTTP response."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---- request bodies ----------------------------------------------------------

# OpenAI parameters llmq does not implement, with the values that mean "off": those are
# accepted (and dropped), anything else is refused by name.
_NEUTRAL_BOTH: dict[str, tuple] = {
    "frequency_penalty": (None, 0), "presence_penalty": (None, 0), "logit_bias": (None, {}), "n": (None, 1),
}
_NEUTRAL: dict[Kind, dict[str, tuple]] = {
    "chat": {
        **_NEUTRAL_BOTH, "logprobs": (None, False), "top_logprobs": (None, 0), "tools": (None, []),
        "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None,),
        # Without tools (refused unless empty) this cannot change anything.
        "parallel_tool_calls": (None, True, False),
        "response_format": (None, {"type": "text"}), "service_tier": (None, "auto", "default"),
        "store": (None, False), "modalities": (None, ["text"]), "reasoning_effort": (None,), "verbosity": (None,),
        "prediction": (None,), "audio": (None,), "web_search_options": (None,), "moderation": (None,),
    },
    "completion": {**_NEUTRAL_BOTH, "logprobs": (None,), "echo": (None, False), "best_of": (None, 1),
                   "suffix": (None, "")},
}
# Cache-routing hints: they never change the output, so any value is accepted and dropped.
_HINTS = {"chat": {"prompt_cache_key", "prompt_cache_retention", "prompt_cache_options"}, "completion": set()}
# On messages: what the SDK echoes back when a client appends a reply it got to `messages`.
_MESSAGE_NEUTRAL = {"refusal": (None,), "tool_calls": (None, []), "function_call": (None,), "audio": (None,),
                    "annotations": (None, []), "name": (None,)}


def _json_kind(value: Any) -> str:
    return "bool" if isinstance(value, bool) else "number" if isinstance(value, int | float) else type(value).__name__


def _is_neutral(value: Any, neutrals: tuple) -> bool:
    # By JSON kind as well as value: in Python `False == 0` and `True == 1`, which must not make `n: true` neutral.
    return any(_json_kind(value) == _json_kind(n) and value == n for n in neutrals)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _TextPart(_Strict):
    type: str
    text: str

    @field_validator("type")
    @classmethod
    def _only_text(cls, value: str) -> str:
        if value != "text":
            raise PydanticCustomError("unsupported_value", "content parts of type '{type}' are not supported; "
                                      "llmq takes text only", {"type": value})
        return value


Content = Annotated[
    Annotated[str, Tag("string")] | Annotated[list[_TextPart], Tag("parts")],
    Discriminator(lambda v: "string" if isinstance(v, str) else "parts" if isinstance(v, list) else None,
                  custom_error_type="invalid_type", custom_error_message="give a string or a list of text parts"),
]


class _Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Content
    refusal: Any = None
    tool_calls: Any = None
    function_call: Any = None
    audio: Any = None
    annotations: Any = None
    name: Any = None

    @field_validator("role")
    @classmethod
    def _no_tool_roles(cls, role: str) -> str:
        if role in ("tool", "function"):
            raise PydanticCustomError("unsupported_value", "role '{role}' is not supported: llmq has no tool calling",
                                      {"role": role})
        return role

    @field_validator(*_MESSAGE_NEUTRAL)
    @classmethod
    def _neutral_only(cls, value: Any, info) -> Any:
        if not _is_neutral(value, _MESSAGE_NEUTRAL[info.field_name]):
            raise PydanticCustomError("unsupported_parameter", "not supported by llmq; leave it out or send null")
        return value

    def text(self) -> str:
        # Parts joined with a newline, as vLLM's OpenAI server does, so both render the same prompt.
        return self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)


class _StreamOptions(_Strict):
    include_usage: bool | None = None
    include_obfuscation: bool | None = None

    @field_validator("include_obfuscation")
    @classmethod
    def _no_obfuscation(cls, value: bool | None) -> bool | None:
        if value:  # a side-channel mitigation a client asked for must not be silently left out
            raise PydanticCustomError("unsupported_value", "stream obfuscation is not supported; send false")
        return value


class _Body(_Strict):
    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)  # OpenAI's range, narrower than llmq's
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stop: list[Annotated[str, Field(min_length=1)]] | None = Field(default=None, max_length=4)
    seed: int | None = None
    stream: bool | None = None
    stream_options: _StreamOptions | None = None
    user: str | None = None
    safety_identifier: str | None = None
    metadata: dict[str, str] | None = None
    # llmq's own, where OpenAI has none
    top_k: int | None = None
    priority: int | None = None
    adapter: str | None = None
    deadline: str | None = None
    # Webhooks (llmq's, like Replicate's): the `openai` client sends them with `extra_body`.
    webhook: str | None = None
    webhook_events_filter: list[str] | None = None

    @model_validator(mode="before")
    @classmethod
    def _normalise(cls, data: Any) -> Any:
        """`stop` may be one string; JSON's 4.0 is the integer 4 (strict validation still refuses 4.5)."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if isinstance(data.get("stop"), str):
            data["stop"] = [data["stop"]]
        for name in ("max_tokens", "max_completion_tokens", "seed", "top_k", "priority"):
            if isinstance(data.get(name), float) and data[name].is_integer():
                data[name] = int(data[name])
        return data


class ChatCompletionBody(_Body):
    messages: list[_Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


class CompletionBody(_Body):
    prompt: str

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, value: Any) -> Any:
        if not isinstance(value, list):
            return value
        if len(value) == 1 and isinstance(value[0], str):
            return value[0]
        if value and all(isinstance(p, str) for p in value):
            raise PydanticCustomError("unsupported_value", "llmq takes one prompt per request; send these {count} "
                                      "prompts as {count} requests", {"count": len(value)})
        if value and all(isinstance(p, int | list) and not isinstance(p, bool) for p in value):
            raise PydanticCustomError("unsupported_value", "token-id prompts are not supported; send text")
        return value


_BODIES: dict[Kind, type[_Body]] = {"chat": ChatCompletionBody, "completion": CompletionBody}


def body_schema(kind: Kind, ref_template: str) -> tuple[dict, dict]:
    """(the JSON Schema of a call's body, the schemas it refers to) for the OpenAPI
    document: the parameters llmq takes, and those it accepts only with their neutral
    values, as the enums of those values."""
    schema = _BODIES[kind].model_json_schema(ref_template=ref_template)
    defs = schema.pop("$defs", {})
    for name, neutrals in _NEUTRAL[kind].items():
        schema["properties"][name] = {"enum": list(neutrals),
                                      "description": "Not implemented by llmq: accepted only with this value."}
    for name in _HINTS[kind]:
        schema["properties"][name] = {"description": "A cache-routing hint: accepted and ignored."}
    return schema, defs


@dataclass(frozen=True)
class OpenAICall:
    """One OpenAI call as llmq runs it: the spec to enqueue and how to answer."""

    spec: RequestSpec
    kind: Kind
    model: str  # as the client wrote it
    stream: bool
    include_usage: bool
    max_tokens_param: str = "max_tokens"  # the name the client used, for limit errors


def parse_openai_body(kind: Kind, raw: bytes) -> OpenAICall:
    """The body of a chat or completion call, checked and translated; OpenAIError (400) if refused."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        raise OpenAIError(400, "the body is not valid JSON", code="invalid_json") from None
    return openai_call(kind, body)


def openai_call(kind: Kind, body: Any) -> OpenAICall:
    """A decoded body of a chat or completion call (also a batch line's `body`), checked
    and translated; OpenAIError (400) if refused."""
    if not isinstance(body, dict):
        raise OpenAIError(400, "the body must be a JSON object", code="invalid_type")
    model = _BODIES[kind]
    known = {}
    for name, value in body.items():
        if name in model.model_fields:
            known[name] = value
        elif name in _NEUTRAL[kind]:
            if not _is_neutral(value, _NEUTRAL[kind][name]):
                allowed = " or ".join(json.dumps(v) for v in _NEUTRAL[kind][name])
                raise OpenAIError(400, f"'{name}' is not supported by llmq; only {allowed} is accepted",
                                  name, "unsupported_parameter")
        elif name not in _HINTS[kind]:
            raise OpenAIError(400, f"Unrecognized request argument supplied: {name}", name, "unknown_parameter")
    try:
        parsed = model.model_validate(known)
    except ValidationError as exc:
        error = exc.errors()[0]
        raise _refusal(error, _param(error["loc"])) from None
    return to_spec(parsed)


def to_spec(body: ChatCompletionBody | CompletionBody) -> OpenAICall:
    """A checked body as the llmq request it means; OpenAIError (400) where llmq's own bounds refuse it."""
    chat = isinstance(body, ChatCompletionBody)
    # 1) input; `developer` is OpenAI's newer name for the system role
    if chat:
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        input_ = {"messages": messages}
    else:
        input_ = {"prompt": body.prompt}
    # 2) params: only what the client set, so llmq's defaults stay llmq's, except that a
    #    completion's length defaults to OpenAI's 16 tokens
    params = {k: v for k in ("temperature", "top_p", "top_k", "stop", "seed") if (v := getattr(body, k)) is not None}
    max_tokens_param = "max_completion_tokens" if chat and body.max_completion_tokens is not None else "max_tokens"
    max_tokens = getattr(body, max_tokens_param)
    if max_tokens is not None or not chat:
        params["max_tokens"] = max_tokens if max_tokens is not None else 16
    # 3) streaming options only mean something on a stream, as OpenAI says
    if body.stream_options is not None and not body.stream:
        raise OpenAIError(400, "'stream_options' is only allowed when 'stream' is true", "stream_options",
                          "invalid_value")
    metadata = {**(body.metadata or {})}
    metadata.update({k: v for k in ("user", "safety_identifier") if (v := getattr(body, k)) is not None})
    fields = {"model": body.model, "input": input_, "params": params, "metadata": metadata}
    fields.update({k: v for k in ("adapter", "priority", "deadline", "webhook", "webhook_events_filter")
                   if (v := getattr(body, k)) is not None})
    try:
        spec = RequestSpec.model_validate(fields)
    except ValidationError as exc:  # llmq's own bounds (seed ≥ 0, metadata sizes, deadline format)
        error = exc.errors()[0]
        raise _refusal(error, openai_param(describe_error(error)[0], max_tokens_param)) from None
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return OpenAICall(spec, "chat" if chat else "completion", body.model, bool(body.stream), include_usage,
                      max_tokens_param)


def openai_param(field: str, max_tokens_param: str = "max_tokens") -> str:
    """The OpenAI parameter an llmq field came from: `params.max_tokens` → `max_tokens`
    (or `max_completion_tokens`, if that is what the client sent), `input.prompt` → `prompt`."""
    head, _, rest = field.partition(".")
    name = rest if head in ("params", "input") and rest else field
    return max_tokens_param if name == "max_tokens" else name


def limit_error(call: OpenAICall, over: LimitError) -> OpenAIError:
    """A deployment limit (`RequestSpec.over_limits`) in OpenAI's terms. A prompt over the limit
    gets OpenAI's `context_length_exceeded`, the code clients check before shortening a prompt."""
    param = openai_param(over.field, call.max_tokens_param)
    code = "context_length_exceeded" if over.type == "prompt_too_large" else "invalid_value"
    return OpenAIError(400, over.message.replace(over.field, param), param, code)


def _param(loc: tuple) -> str:
    # Drop the tag pydantic puts in the path of `content` (string or parts), as the client never wrote it.
    parts = [str(p) for i, p in enumerate(loc) if not (i and loc[i - 1] == "content" and p in ("string", "parts"))]
    return ".".join(parts)


def _refusal(error: dict, param: str) -> OpenAIError:
    kind = error["type"]
    if kind == "missing":
        return OpenAIError(400, f"Missing required parameter: '{param}'.", param, "missing_required_parameter")
    if kind == "extra_forbidden":
        return OpenAIError(400, f"Unrecognized request argument supplied: {param}", param, "unknown_parameter")
    if kind not in ("unsupported_parameter", "unsupported_value", "invalid_type"):
        kind = "invalid_type" if kind.endswith("_type") else "invalid_value"
    return OpenAIError(400, f"Invalid '{param}': {error['msg']}", param, kind)


# ---- answers -------------------------------------------------------------------

# Failures that are the request's own fault (a worker checks limits again, and its own may be
# lower than the gateway's) stay 4xx, so no one retries them: llmq error type -> (status, param, code).
_REQUEST_FAULTS = {
    "prompt_too_large": (400, None, "context_length_exceeded"),
    "invalid_request": (400, None, "invalid_value"),
    "model_not_found": (404, "model", "model_not_found"),
}


def view_error(view: RequestView) -> OpenAIError | None:
    """What a client is told about a request that ended without a result; None if it succeeded.
    `x-should-retry: false` stops the openai SDK's automatic retries (it retries 409 and 5xx)
    where sending the same request again cannot help or would undo someone's decision."""
    if view.status is Status.succeeded:
        return None
    no_retry = {"x-should-retry": "false"}
    if view.status is Status.cancelled:
        # 409: the request's state conflicts with giving a result. Not 499 (nginx's "client
        # closed"): the client waiting is still here; someone cancelled through DELETE /v1/requests.
        return OpenAIError(409, "the request was cancelled before it finished", None, "cancelled", headers=no_retry)
    if view.status is Status.expired:
        # 504: llmq did not start it before the deadline the client set; the same deadline cannot be met again.
        return OpenAIError(504, "the deadline passed before a worker started the request", "deadline",
                           "deadline_exceeded", "server_error", no_retry)
    if view.status is not Status.failed:
        raise ValueError(f"request {view.id} has not ended: {view.status.value}")
    error_type = view.error.type if view.error else "failed"
    message = view.error.message if view.error else "the request failed"
    if error_type in _REQUEST_FAULTS:
        status, param, code = _REQUEST_FAULTS[error_type]
        return OpenAIError(status, message, param, code)
    # A request that took down every worker that ran it must not be sent again by an SDK on its own.
    headers = no_retry if error_type == "too_many_attempts" else None
    return OpenAIError(500, message, None, error_type, "server_error", headers)


def _finish_reason(reason: str | None) -> str:
    if reason in ("error", "cancelled"):
        raise ValueError(f"finish reason {reason!r} is an error, not an answer: send view_error(view)")
    return "length" if reason == "length" else "stop"


def _usage(usage: Usage | None) -> dict | None:
    return usage.model_dump(include={"prompt_tokens", "completion_tokens", "total_tokens"}) if usage else None


def _response_id(call: OpenAICall, request_id: str) -> str:
    return f"chatcmpl-{request_id}" if call.kind == "chat" else f"cmpl-{request_id}"


def completion_response(call: OpenAICall, request_id: str, view: RequestView) -> dict:
    """The non-streamed answer; raises view_error's OpenAIError if the request did not succeed."""
    error = view_error(view)
    if error is not None:
        raise error
    text = view.output.text if view.output else ""
    choice: dict[str, Any] = {"index": 0, "finish_reason": _finish_reason(view.output and view.output.finish_reason),
                              "logprobs": None}
    if call.kind == "chat":
        choice["message"] = {"role": "assistant", "content": text, "refusal": None}
    else:
        choice["text"] = text
    submitted = view.timings.submitted_at
    return {
        "id": _response_id(call, request_id),
        "object": "chat.completion" if call.kind == "chat" else "text_completion",
        "created": int(submitted.timestamp() if submitted else time.time()),
        # A fine-tuned model runs as its base plus an adapter: answer with the name the client used.
        "model": call.model if split_fine_tuned(call.model) else (view.model or call.model),
        "choices": [choice],
        "usage": _usage(view.usage),
        "system_fingerprint": None,
    }


@dataclass(frozen=True)
class StreamChunks:
    """The chunks of one streamed answer, in order: `first()`, `delta(text)` per piece,
    `final(finish_reason)`, then `usage(usage)` only if `call.include_usage`, then SSE_DONE.
    Every chunk has the same id, created and model, as OpenAI's do. An error mid-stream is
    sent as `sse(error.body())`; the openai SDK raises it as an APIError."""

    call: OpenAICall
    request_id: str
    created: int  # Unix seconds
    model: str

    def first(self) -> dict:
        # A completion stream has no role; an empty text piece opens it just as early.
        return self._chunk({"role": "assistant", "content": ""}, "")

    def delta(self, text: str) -> dict:
        return self._chunk({"content": text}, text)

    def final(self, finish_reason: str | None) -> dict:
        return self._chunk({}, "", _finish_reason(finish_reason))

    def usage(self, usage: Usage) -> dict:
        return self._envelope([], _usage(usage))

    def _chunk(self, delta: dict, text: str, finish_reason: str | None = None) -> dict:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason, "logprobs": None}
        if self.call.kind == "chat":
            choice["delta"] = delta
        else:
            choice["text"] = text
        return self._envelope([choice], None)

    def _envelope(self, choices: list, usage: dict | None) -> dict:
        chunk = {
            "id": _response_id(self.call, self.request_id),
            "object": "chat.completion.chunk" if self.call.kind == "chat" else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "system_fingerprint": None,
        }
        if self.call.include_usage:  # OpenAI: with include_usage, every chunk but the last has usage null
            chunk["usage"] = usage
        return chunk


def sse(data: dict | str) -> bytes:
    """One server-sent event: a chunk (or an error body) as JSON, or a one-line string such as `[DONE]`."""
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {text}\n\n".encode()
