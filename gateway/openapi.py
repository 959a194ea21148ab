"""The OpenAPI 3.1 document of the HTTP API, built from the same pydantic
models that validate requests, so the two cannot drift apart."""

from __future__ import annotations

from functools import cache

from pydantic.json_schema import models_json_schema

from gateway.batches.openapi import bulk_paths
from gateway.fine_tuning.openapi import fine_tuning_defs, fine_tuning_paths
from gateway.optimization.openapi import optimization_defs, optimization_paths
from gateway.openai_compat import body_schema
from shared.schema import Accepted, ErrorBody, ModelList, RequestView, SubmitRequest

_REF = "#/components/schemas/{model}"


def _error(description: str) -> dict:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": _REF.format(model="ErrorBody")}}}}


def _json(description: str, model: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": {"$ref": _REF.format(model=model)}}}}


# With auth on (LLMQ_AUTH, the default), /v1 needs `Authorization: Bearer <key>`.
_KEY = [{"apiKey": []}]

# The IETF httpapi Idempotency-Key draft, and RFC 7240's `wait` preference (as Replicate's API uses it).
_IDEMPOTENCY_KEY_PARAM = {
    "name": "Idempotency-Key", "in": "header", "required": False,
    "schema": {"type": "string", "minLength": 1, "maxLength": 255},
    "description": "Makes a retry safe (the IETF httpapi Idempotency-Key draft): within "
                   "LLMQ_IDEMPOTENCY_WINDOW_SECONDS, the same key from the same API key answers with the request it "
                   "first admitted (`Idempotent-Replayed: true`) and enqueues nothing; with another body it is refused "
                   "(422 `idempotency_key_reused`). A submit refused with 503 leaves the key free.",
}
_PREFER_PARAM = {
    "name": "Prefer", "in": "header", "required": False, "schema": {"type": "string"},
    "description": "`wait=N` (RFC 7240): hold the answer up to N seconds (capped) until the request is finished, "
                   "then answer 200 with its record. Preferences that can't be read are ignored.",
}
_CACHE_CONTROL_PARAM = {
    "name": "Cache-Control", "in": "header", "required": False, "schema": {"type": "string"},
    "description": "`no-cache`: run the request even if the result cache holds the answer to an identical "
                   "deterministic request (temperature 0, or a seed) by this API key; `no-store`: that, and keep "
                   "nothing of its answer in the cache.",
}
_CACHE_STATUS = {"Cache-Status": {"schema": {"type": "string"},
                                  "description": "RFC 9211: `llmq; hit` (answered from the result cache, final at "
                                                 "once, nothing enqueued), `llmq; fwd=uri-miss`, or `llmq; fwd=bypass` "
                                                 "(Cache-Control asked for a fresh run). Absent for a sampled request "
                                                 "without a seed."}}
_REPLAYED = {"Idempotent-Replayed": {"schema": {"type": "string", "enum": ["true"]},
                                     "description": "The answer is for the request the Idempotency-Key admitted before."}}
_PREFERENCE_APPLIED = {"Preference-Applied": {"schema": {"type": "string"},
                                              "description": "`wait=N`: it waited up to N seconds (after the cap)."}}

_ID_PARAM = {"name": "id", "in": "path", "required": True, "schema": {"type": "string", "maxLength": 128},
             "description": "The request id from `POST /v1/requests`, or a Kafka producer's own id."}


# One Server-Sent Event, as event-stream readers (schemathesis among them) see it; `data` holds JSON.
_EVENT = {"type": "object", "properties": {"event": {"type": "string"}, "id": {"type": "string"},
                                           "data": {"type": "string"}}}
_OPENAI_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type", "param", "code"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                   "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}


def _openai_operation(kind: str, summary: str, operation_id: str, answer: str, auth: bool) -> dict:
    schema, _ = body_schema(kind, _REF)

    def error(description: str) -> dict:
        return {"description": description, "content": {"application/json": {"schema": _OPENAI_ERROR}}}

    return {"post": {
        "summary": summary,
        "description": "OpenAI's API, over llmq's queue: the call is admitted as `POST /v1/requests` is (recorded, "
                       "rate-limited, enqueued; `Idempotency-Key` honoured), then answered once its request ends, or "
                       "streamed as Server-Sent Events with `stream: true`. A client that disconnects cancels it. "
                       "Errors have OpenAI's shape.",
        "operationId": operation_id,
        "security": _KEY if auth else [],
        "parameters": [{"name": "Idempotency-Key", "in": "header", "required": False,
                        "schema": {"type": "string", "minLength": 1, "maxLength": 255},
                        "description": "A retry with the same key gets the same request."}],
        "requestBody": {"required": True, "content": {"application/json": {"schema": schema}}},
        "responses": {
            "200": {"description": f"The {answer} (OpenAI's shape), or with `stream: true` its chunks as "
                                   "`data:` events ending `data: [DONE]`.",
                    "headers": {"x-request-id": {"schema": {"type": "string"}}},
                    "content": {"application/json": {"schema": {"type": "object"}},
                                "text/event-stream": {"schema": _EVENT}}},
            "400": error("Not valid JSON, a parameter missing, of the wrong type or out of range, one llmq does not "
                         "implement (`unsupported_parameter`), or over a limit (`context_length_exceeded`)."),
            "401": error("No API key, or an unknown or revoked one (when auth is on)."),
            "404": error("`model` is not served here (`model_not_found`)."),
            "409": error("The request was cancelled (`DELETE /v1/requests/{id}`) before it finished."),
            "413": error("The body is over LLMQ_MAX_BODY_BYTES."),
            "415": error("Content-Type is not application/json."),
            "429": error("Over this key's rate (`rate_limited`) or the queue is full (`queue_full`); see Retry-After."),
            "500": error("The request failed in the engine."),
            "503": error("Redis or the broker is unreachable."),
            "504": error("No result within LLMQ_COMPLETION_TIMEOUT_SECONDS (the request was cancelled), or its "
                         "deadline passed before a worker started it."),
        },
    }}


def _openai_defs() -> dict:
    return {name: schema for kind in ("chat", "completion") for name, schema in body_schema(kind, _REF)[1].items()}


@cache
def openapi_document(auth: bool = True) -> dict:
    """The document of a gateway with API keys on (`auth`, LLMQ_AUTH) or off: with them
    off, no operation asks for the Bearer key, as none does."""
    _, top = models_json_schema(
        [(SubmitRequest, "validation"), (Accepted, "serialization"), (RequestView, "serialization"),
         (ErrorBody, "serialization"), (ModelList, "serialization")],
        ref_template=_REF,
    )
    unavailable = _error("Redis or the broker is unreachable; nothing was recorded.")
    unauthorized = _error("No API key, or an unknown or revoked one (when auth is on).")
    return {
        "openapi": "3.1.0",
        "info": {"title": "llmq", "version": "1.0.0",
                 "description": "Queue-backed LLM serving: submit a generation request, then poll, wait or cancel. "
                                "With auth on, /v1 calls need `Authorization: Bearer <key>`."},
        "paths": {
            "/v1/requests": {
                "post": {
                    "summary": "Submit a generation request",
                    "operationId": "submitRequest",
                    "security": _KEY if auth else [],
                    "parameters": [_IDEMPOTENCY_KEY_PARAM, _PREFER_PARAM, _CACHE_CONTROL_PARAM],
                    "requestBody": {"required": True,
                                    "content": {"application/json": {"schema": {"$ref": _REF.format(model="SubmitRequest")}}}},
                    "responses": {
                        "200": {**_json("Finished within `Prefer: wait=N`: the request's record.", "RequestView"),
                                "headers": {"Location": {"schema": {"type": "string"}}, **_PREFERENCE_APPLIED,
                                            **_REPLAYED, **_CACHE_STATUS}},
                        "202": {**_json("Accepted: the broker has the request (or had it, for a replayed "
                                        "Idempotency-Key; `status` is its status now), or answered from the result "
                                        "cache (`status` is `succeeded`; see Cache-Status).", "Accepted"),
                                "headers": {"Location": {"schema": {"type": "string"}}, **_PREFERENCE_APPLIED,
                                            **_REPLAYED, **_CACHE_STATUS}},
                        "400": _error("The body is not JSON."),
                        "413": _error("The body or the prompt is too large."),
                        "401": unauthorized,
                        "409": _error("The chosen `id` is in use (`id_in_use`), whichever key's request it is."),
                        "415": _error("Content-Type is not application/json."),
                        "422": _error("A field is missing, of the wrong type, unknown or out of range, or the "
                                      "Idempotency-Key is empty or too long (`invalid_request`); `model` names one "
                                      "no worker serves (`model_not_found`); `webhook` points at a loopback, private or "
                                      "link-local address or does not resolve (`invalid_request`); or the "
                                      "Idempotency-Key was used with another body (`idempotency_key_reused`)."),
                        "429": _error("Over this key's rate (`rate_limited`) or the queue is full (`queue_full`); "
                                      "see Retry-After."),
                        "503": unavailable,
                    },
                }
            },
            "/v1/requests/{id}": {
                "get": {
                    "summary": "Read a request's status and result",
                    "operationId": "getRequest",
                    "security": _KEY if auth else [],
                    "parameters": [_ID_PARAM, {
                        "name": "wait", "in": "query", "required": False,
                        "schema": {"type": "number", "minimum": 0},
                        "description": "Hold the answer up to this many seconds (capped) until the request is finished.",
                    }],
                    "responses": {
                        "200": _json("The request as it is now.", "RequestView"),
                        "401": unauthorized,
                        "404": _error("No such request (or it expired)."),
                        "422": _error("`wait` is not a non-negative number."),
                        "503": unavailable,
                    },
                },
                "delete": {
                    "summary": "Cancel a request",
                    "operationId": "cancelRequest",
                    "security": _KEY if auth else [],
                    "parameters": [_ID_PARAM],
                    "responses": {
                        "200": _json("Cancelled (or already cancelled).", "RequestView"),
                        "401": unauthorized,
                        "404": _error("No such request."),
                        "409": _error("The request already finished."),
                        "503": unavailable,
                    },
                },
            },
            "/v1/requests/{id}/stream": {
                "get": {
                    "summary": "Follow a request's text as it is generated (Server-Sent Events)",
                    "description": "Events: `delta` (`{\"text\"}`: new text), `reset` (`{\"text\"}`: the whole text so "
                                   "far, replacing what was received: after a resume the stream no longer holds, or "
                                   "when another worker ran the request again), `done` (the final record, as `GET` "
                                   "shows it), `error` (the stream was lost: reconnect). Every event has an `id`; "
                                   "reconnecting with `Last-Event-ID` resumes after it. Works on any gateway replica.",
                    "operationId": "streamRequest",
                    "security": _KEY if auth else [],
                    "parameters": [_ID_PARAM, {
                        "name": "Last-Event-ID", "in": "header", "required": False, "schema": {"type": "string"},
                        "description": "Resume after this event (what EventSource sends when it reconnects).",
                    }],
                    "responses": {
                        "200": {"description": "The event stream.",
                                "content": {"text/event-stream": {"schema": _EVENT}}},
                        "400": _error("`Last-Event-ID` is not an event of this stream (`invalid_last_event_id`)."),
                        "401": unauthorized,
                        "404": _error("No such request (or it expired)."),
                        "503": unavailable,
                    },
                },
            },
            "/v1/chat/completions": _openai_operation("chat", "Create a chat completion (OpenAI)", "createChatCompletion",
                                                      "`chat.completion`", auth),
            "/v1/completions": _openai_operation("completion", "Create a text completion (OpenAI)", "createCompletion",
                                                 "`text_completion`", auth),
            "/v1/models": {
                "get": {
                    "summary": "List the models the workers serve and the caller's fine-tuned models (OpenAI's "
                               "shape)",
                    "operationId": "listModels",
                    "security": _KEY if auth else [],
                    "responses": {
                        "200": _json("The served models (empty until a worker has started), and the fine-tuned "
                                     "models this key published (`owned_by`: the key's name).", "ModelList"),
                        "401": unauthorized,
                        "503": unavailable,
                    },
                },
            },
            **bulk_paths(_KEY if auth else []),
            **fine_tuning_paths(_KEY if auth else []),
            **optimization_paths(_KEY if auth else []),
            "/v1/webhooks/secret": {
                "get": {
                    "summary": "The secret that signs this key's webhook deliveries (Standard Webhooks)",
                    "operationId": "getWebhookSecret",
                    "security": _KEY if auth else [],
                    "responses": {
                        "200": {"description": "The secret (`whsec_...`), to verify deliveries with.",
                                "content": {"application/json": {"schema": {
                                    "type": "object", "required": ["secret"],
                                    "properties": {"secret": {"type": "string"}}}}}},
                        "401": unauthorized,
                        "503": unavailable,
                    },
                },
            },
            "/healthz": {"get": {"summary": "The process is alive", "operationId": "healthz",
                                 "responses": {"200": {"description": "Alive."}}}},
            "/readyz": {"get": {"summary": "Redis and the broker are reachable", "operationId": "readyz",
                                "responses": {"200": {"description": "Ready."},
                                              "503": {"description": "A dependency is down."}}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "operationId": "metrics",
                                 "responses": {"200": {"description": "Prometheus text format.",
                                                       "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
        },
        "components": {
            "schemas": {**top["$defs"], **_openai_defs(), **fine_tuning_defs(), **optimization_defs()},
            **({"securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer",
                                               "description": "An llmq API key (`llmq keys create NAME`)."}}}
               if auth else {}),
        },
    }
