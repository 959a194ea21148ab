"""The `/v1/files` and `/v1/batches` operations of the gateway's OpenAPI document,
in OpenAI's shapes (File, Batch, lists, OpenAI's error body)."""

from __future__ import annotations

from gateway.batches.files import FILE_ID
from gateway.batches.lines import ENDPOINTS
from gateway.batches.objects import BATCH_ID, TIMESTAMPS
from gateway.openapi_shapes import NULLABLE_INT as _NULLABLE_INT, NULLABLE_STR as _NULLABLE_STR
from gateway.openapi_shapes import error_response as _error, list_of as _list, ok_response as _ok
from gateway.openapi_shapes import query_param as _query
from shared.schema import MAX_METADATA_ITEMS, RequestSpec

_METADATA = {"type": "object", "maxProperties": MAX_METADATA_ITEMS, "propertyNames": {"maxLength": 64},
             "additionalProperties": {"type": "string", "maxLength": 512}}

FILE = {"type": "object", "required": ["id", "object", "bytes", "created_at", "filename", "purpose", "status"],
        "properties": {"id": {"type": "string"}, "object": {"const": "file"}, "bytes": {"type": "integer"},
                       "created_at": {"type": "integer"}, "filename": {"type": "string"},
                       "purpose": {"enum": ["batch", "batch_output", "fine-tune"]}, "status": {"const": "processed"},
                       "expires_at": _NULLABLE_INT, "status_details": _NULLABLE_STR}}
BATCH = {"type": "object",
         "required": ["id", "object", "endpoint", "input_file_id", "completion_window", "status", "created_at",
                      "request_counts"],
         "properties": {
             "id": {"type": "string"}, "object": {"const": "batch"}, "endpoint": {"enum": list(ENDPOINTS)},
             "model": _NULLABLE_STR, "input_file_id": {"type": "string"}, "completion_window": {"const": "24h"},
             "status": {"enum": ["validating", "failed", "in_progress", "finalizing", "completed", "expired",
                                 "cancelling", "cancelled"]},
             "output_file_id": _NULLABLE_STR, "error_file_id": _NULLABLE_STR, "created_at": {"type": "integer"},
             **{name: _NULLABLE_INT for name in TIMESTAMPS},
             "errors": {"type": ["object", "null"], "properties": {"object": {"const": "list"}, "data": {
                 "type": "array", "items": {"type": "object", "required": ["code", "message"], "properties": {
                     "code": {"type": "string"}, "message": {"type": "string"}, "param": _NULLABLE_STR,
                     "line": _NULLABLE_INT}}}}},
             "request_counts": {"type": "object", "required": ["total", "completed", "failed", "cancelled"],
                                "properties": {name: {"type": "integer"}
                                               for name in ("total", "completed", "failed", "cancelled")},
                                "description": "OpenAI's counts, and llmq's `cancelled`: completed + failed + "
                                               "cancelled = total."},
             "metadata": {"anyOf": [_METADATA, {"type": "null"}]},
             "webhook": {"anyOf": [{"$ref": "#/components/schemas/WebhookDeliveries"}, {"type": "null"}],
                         "description": "llmq's: how the batch's webhook deliveries went (null: it has none)."},
         }}
_REQUEST_FIELDS = RequestSpec.model_json_schema()["properties"]
# The batch's webhook, checked as a request's is; it gets `batch.start` (validated, now
# `in_progress`) and `batch.completed` (ended, whatever the status). Its lines get none.
_WEBHOOK_PARAMS = {
    "webhook": {**_REQUEST_FIELDS["webhook"], "description": "llmq's: http(s) URL that gets this batch's events "
                "(`batch.start`, `batch.completed`), signed (Standard Webhooks). A host that doesn't resolve to "
                "public addresses only: 400."},
    "webhook_events_filter": {
        **_REQUEST_FIELDS["webhook_events_filter"],
        "description": "llmq's: which events reach `webhook`: `start` (validated, now `in_progress`), `completed` "
                       "(ended, whatever its status). Omitted: both."},
}
_FILE_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string", "pattern": FILE_ID.pattern}}
_BATCH_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string", "pattern": BATCH_ID.pattern}}


def bulk_paths(key: list) -> dict:
    """The operations, each asking for `key` (the Bearer key's security requirement, or none)."""
    unauthorized = _error("No API key, or an unknown or revoked one (when auth is on).")
    unavailable = _error("Redis is unreachable.")
    no_file = _error("No such file, or another API key's.")
    no_batch = _error("No such batch, or another API key's.")
    after = _query("after", {"type": "string"}, "The id of the last object of the previous page.")

    def op(summary: str, operation_id: str, responses: dict, **more) -> dict:
        return {"summary": summary, "operationId": operation_id, "security": key,
                "responses": {**responses, "401": unauthorized}, **more}

    return {
        "/v1/files": {
            "post": op("Upload a batch input or fine-tuning file (OpenAI)", "createFile", {
                "200": _ok("The file.", FILE),
                "400": _error("`file` or `purpose` missing, `purpose` not `batch` or `fine-tune`, or not a multipart "
                              "form."),
                "413": _error("The file is over LLMQ_MAX_FILE_BYTES."),
                "415": _error("Not multipart/form-data."),
            }, requestBody={"required": True, "content": {"multipart/form-data": {"schema": {
                "type": "object", "required": ["file", "purpose"], "additionalProperties": False,
                "properties": {"file": {"type": "string", "format": "binary"}, "purpose": {"enum": ["batch", "fine-tune"]}}}}}}),
            "get": op("List this key's files (OpenAI)", "listFiles", {
                "200": _ok("Newest first unless `order=asc`.", _list(FILE)),
                "400": _error("`limit` or `order` out of range."),
            }, parameters=[after, _query("limit", {"type": "integer", "minimum": 1, "maximum": 10_000}, "Page size."),
                           _query("order", {"enum": ["asc", "desc"]}, "By creation time."),
                           _query("purpose", {"type": "string"}, "Only files of this purpose.")]),
        },
        "/v1/files/{id}": {
            "get": op("Read a file's metadata (OpenAI)", "retrieveFile", {"200": _ok("The file.", FILE),
                                                                          "404": no_file}, parameters=[_FILE_ID]),
            "delete": op("Delete a file (OpenAI)", "deleteFile", {"200": _ok("Deleted.", {
                "type": "object", "required": ["id", "object", "deleted"],
                "properties": {"id": {"type": "string"}, "object": {"const": "file"}, "deleted": {"const": True}}}),
                "404": no_file}, parameters=[_FILE_ID]),
        },
        "/v1/files/{id}/content": {
            "get": op("Read a file's content (OpenAI)", "downloadFile", {
                "200": {"description": "The JSONL content.",
                        "content": {"application/jsonl": {"schema": {"type": "string"}}}},
                "404": no_file}, parameters=[_FILE_ID]),
        },
        "/v1/batches": {
            "post": op("Create a batch (OpenAI)", "createBatch", {
                "200": _ok("The batch, `validating`: the gateways check its file, then run it.", BATCH),
                "400": _error("Not valid JSON, a parameter missing or unknown, an endpoint llmq doesn't batch, a "
                              "window other than 24h, a file whose purpose is not `batch`, or a `webhook` "
                              "that is not an http(s) URL or points at a loopback, private or link-local address."),
                "404": no_file,
                "413": _error("The body is over LLMQ_MAX_BODY_BYTES."),
                "415": _error("Content-Type is not application/json."),
                "503": unavailable,
            }, requestBody={"required": True, "content": {"application/json": {"schema": {
                "type": "object", "required": ["input_file_id", "endpoint", "completion_window"],
                "additionalProperties": False,
                "properties": {"input_file_id": {"type": "string"}, "endpoint": {"enum": list(ENDPOINTS)},
                               "completion_window": {"const": "24h"},
                               "metadata": {"anyOf": [_METADATA, {"type": "null"}]}, **_WEBHOOK_PARAMS}}}}}),
            "get": op("List this key's batches, newest first (OpenAI)", "listBatches", {
                "200": _ok("A page of batches.", _list(BATCH)),
                "400": _error("`limit` out of range."),
                "503": unavailable,
            }, parameters=[after, _query("limit", {"type": "integer", "minimum": 1, "maximum": 100}, "Page size.")]),
        },
        "/v1/batches/{id}": {
            "get": op("Read a batch (OpenAI)", "retrieveBatch", {"200": _ok("The batch.", BATCH), "404": no_batch,
                                                                 "503": unavailable}, parameters=[_BATCH_ID]),
        },
        "/v1/batches/{id}/cancel": {
            "post": op("Cancel a batch (OpenAI)", "cancelBatch", {
                "200": _ok("`cancelling` (lines not yet running are cancelled, running ones finish) or "
                           "`cancelled`.", BATCH),
                "404": no_batch,
                "409": _error("The batch already ended."),
                "503": unavailable,
            }, parameters=[_BATCH_ID]),
        },
    }
