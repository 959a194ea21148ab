"""`/v1/files` and `/v1/batches`: OpenAI's Batch API. A file is uploaded (streamed to
disk within LLMQ_MAX_FILE_BYTES), a batch is created `validating` and answered at
once; the gateways' BatchRunner does the rest. Files and batches belong to the
API key that made them: any other key gets a 404, as for requests. A batch may name
a `webhook` (llmq's, as a request may), which gets its `batch.start` and
`batch.completed` events; its lines get none of their own."""

from __future__ import annotations

import json
import time
import uuid
from typing import TYPE_CHECKING

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError
from pydantic import ConfigDict, ValidationError, create_model
from redis.exceptions import RedisError

from gateway.batches.files import FileTooLarge, file_object
from gateway.batches.lines import ENDPOINTS
from gateway.batches.objects import BATCH_ID, batch_object
from gateway.errors import redis_down
from gateway.openai_compat import OpenAIError
from shared.schema import DEFAULT_WEBHOOK_EVENTS, MAX_METADATA_ITEMS, RequestSpec
from shared.webhooks import WebhookUrlError, check_webhook_url

if TYPE_CHECKING:
    from gateway.app import Gateway

PATHS = ("/v1/files", "/v1/files/{id}", "/v1/files/{id}/content", "/v1/batches", "/v1/batches/{id}",
         "/v1/batches/{id}/cancel")
# What uploads may be for: batch inputs, and fine-tuning data (gateway/fine_tuning/).
PURPOSES = ("batch", "fine-tune")
COMPLETION_WINDOW = "24h"  # the only window OpenAI offers
# OpenAI's defaults and bounds of `limit`: (default, most) per list.
_BATCH_PAGE = (20, 100)
_FILE_PAGE = (10_000, 10_000)
_WEBHOOK_FIELDS = ("webhook", "webhook_events_filter")
# A batch's webhook fields, checked exactly as a request's are: RequestSpec's own fields.
_BatchWebhook = create_model("_BatchWebhook", __config__=ConfigDict(strict=True), **{
    name: (RequestSpec.model_fields[name].annotation, RequestSpec.model_fields[name]) for name in _WEBHOOK_FIELDS})


def _not_found(what: str, object_id: str) -> OpenAIError:
    return OpenAIError(404, f"No such {what}: '{object_id}'", "id", "not_found")


def _limit(request: web.Request, default: int, maximum: int) -> int:
    raw = request.query.get("limit", str(default))
    if not raw.isdigit() or not 1 <= int(raw) <= maximum:
        raise OpenAIError(400, f"Invalid 'limit': must be 1 to {maximum}", "limit", "invalid_value")
    return int(raw)


def _webhook_fields(body: dict) -> dict:
    """The batch's `webhook` and the events it gets (space-separated, as on a request's
    record: the runner reads them there), or None for both."""
    try:
        hook = _BatchWebhook.model_validate({name: body.get(name) for name in _WEBHOOK_FIELDS})
    except ValidationError as exc:
        error = exc.errors()[0]
        param = str(error["loc"][0])
        raise OpenAIError(400, f"Invalid '{param}': {error['msg']}", param, "invalid_value") from None
    if hook.webhook is None:
        return {"webhook": None, "webhook_events": None}
    return {"webhook": hook.webhook,
            "webhook_events": " ".join(sorted(hook.webhook_events_filter or DEFAULT_WEBHOOK_EVENTS))}


class BulkRoutes:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/v1/files", self.upload), web.get("/v1/files", self.list_files),
            web.get("/v1/files/{id}", self.get_file), web.delete("/v1/files/{id}", self.delete_file),
            web.get("/v1/files/{id}/content", self.file_content),
            web.post("/v1/batches", self.create_batch), web.get("/v1/batches", self.list_batches),
            web.get("/v1/batches/{id}", self.get_batch), web.post("/v1/batches/{id}/cancel", self.cancel_batch),
        ]

    # ---- files -------------------------------------------------------------------

    async def upload(self, request: web.Request) -> web.Response:
        gw = self.gateway
        tenant = await gw.authenticate(request)
        limit = gw.settings.max_file_bytes
        if (request.content_length or 0) > limit + 64 * 1024:  # the form's own bytes on top of the file
            raise self._too_large(limit)
        if request.content_type != "multipart/form-data":
            raise OpenAIError(415, "send the file as multipart/form-data", None, "unsupported_media_type")
        purpose, meta = None, None
        try:
            reader = await request.multipart()
            while (part := await reader.next()) is not None:
                if not isinstance(part, BodyPartReader):
                    await part.release()  # a nested multipart: not what OpenAI's clients send
                elif part.name == "purpose":
                    purpose = (await part.read_chunk(64)).decode(errors="replace")
                    await part.release()
                elif part.name == "file" and meta is None:
                    meta = await gw.files.save_upload(part, part.filename or "upload.jsonl",
                                                      purpose if purpose in PURPOSES else "batch", tenant, limit)
                else:
                    await part.release()
        except FileTooLarge:
            if meta is not None:
                await gw.files.delete(meta["id"])
            raise self._too_large(limit) from None
        except (ValueError, AssertionError, RuntimeError, HttpProcessingError) as exc:  # a malformed form, in aiohttp's words
            if meta is not None:
                await gw.files.delete(meta["id"])
            raise OpenAIError(400, f"the multipart form could not be read: {exc}", None, "invalid_multipart") \
                from None
        if meta is None or purpose not in PURPOSES:
            if meta is not None:
                await gw.files.delete(meta["id"])
            if meta is None:
                raise OpenAIError(400, "Missing required parameter: 'file'.", "file", "missing_required_parameter")
            raise OpenAIError(400, f"Invalid 'purpose': {purpose!r}; llmq takes files for "
                              f"{' or '.join(repr(p) for p in PURPOSES)}", "purpose", "invalid_value")
        if meta["purpose"] != purpose:  # the form named its purpose after the file
            meta = await gw.files.set_purpose(meta, purpose)
        return web.json_response(file_object(meta))

    @staticmethod
    def _too_large(limit: int) -> OpenAIError:
        return OpenAIError(413, f"the file is over the limit of {limit} bytes (LLMQ_MAX_FILE_BYTES)", "file",
                           "file_too_large")

    async def _owned_file(self, request: web.Request) -> dict:
        tenant = await self.gateway.authenticate(request)
        file_id = request.match_info["id"]
        meta = await self.gateway.files.meta(file_id)
        if meta is None or (self.gateway.settings.auth and meta.get("tenant") != tenant):
            raise _not_found("file", file_id)
        return meta

    async def get_file(self, request: web.Request) -> web.Response:
        return web.json_response(file_object(await self._owned_file(request)))

    async def file_content(self, request: web.Request) -> web.StreamResponse:
        meta = await self._owned_file(request)
        return web.FileResponse(self.gateway.files.content_path(meta["id"]),
                                headers={"Content-Type": "application/jsonl"})

    async def delete_file(self, request: web.Request) -> web.Response:
        meta = await self._owned_file(request)
        await self.gateway.files.delete(meta["id"])
        return web.json_response({"id": meta["id"], "object": "file", "deleted": True})

    async def list_files(self, request: web.Request) -> web.Response:
        gw = self.gateway
        tenant = await gw.authenticate(request)
        limit = _limit(request, *_FILE_PAGE)
        purpose = request.query.get("purpose")
        order = request.query.get("order", "desc")
        if order not in ("asc", "desc"):
            raise OpenAIError(400, "Invalid 'order': 'asc' or 'desc'", "order", "invalid_value")
        newest_first = order == "desc"
        files = [m for m in await gw.files.all_meta() if (not gw.settings.auth or m.get("tenant") == tenant)
                 and (purpose is None or m["purpose"] == purpose)]
        files.sort(key=lambda m: (m["created_at"], m["id"]), reverse=newest_first)
        after = request.query.get("after")
        if after is not None:
            ids = [m["id"] for m in files]
            files = files[ids.index(after) + 1:] if after in ids else []
        page = files[:limit]
        return web.json_response({"object": "list", "data": [file_object(m) for m in page],
                                  "first_id": page[0]["id"] if page else None,
                                  "last_id": page[-1]["id"] if page else None, "has_more": len(files) > limit})

    # ---- batches -------------------------------------------------------------------

    async def create_batch(self, request: web.Request) -> web.Response:
        gw = self.gateway
        tenant = await gw.authenticate(request)
        try:
            body = json.loads(await gw.read_body(request))
        except ValueError:
            raise OpenAIError(400, "the body is not valid JSON", None, "invalid_json") from None
        if not isinstance(body, dict):
            raise OpenAIError(400, "the body must be a JSON object", None, "invalid_type")
        fields = self._batch_fields(body)
        if fields["webhook"] is not None:
            await self._check_webhook(fields["webhook"])
        meta = await gw.files.meta(fields["input_file_id"])
        if meta is None or (gw.settings.auth and meta.get("tenant") != tenant):
            raise _not_found("file", fields["input_file_id"])
        if meta["purpose"] != "batch":
            raise OpenAIError(400, "the input file's purpose must be 'batch'", "input_file_id", "invalid_value")
        now = time.time()
        batch_id = f"batch_{uuid.uuid4().hex}"
        fields.update(id=batch_id, tenant=tenant, status="validating", created_at=now, expires_at=now + 86_400)
        try:
            await gw.batches.create(batch_id, tenant, fields, now)
            batch = await gw.batches.get(batch_id)
        except (RedisError, OSError) as exc:
            raise redis_down(exc) from exc
        gw.batch_runner.nudge()
        return web.json_response(batch_object(batch))

    @staticmethod
    def _batch_fields(body: dict) -> dict:
        for name in ("input_file_id", "endpoint", "completion_window"):
            if not isinstance(body.get(name), str):
                raise OpenAIError(400, f"Missing required parameter: '{name}'.", name, "missing_required_parameter")
        unknown = set(body) - {"input_file_id", "endpoint", "completion_window", "metadata", *_WEBHOOK_FIELDS}
        if unknown:
            name = sorted(unknown)[0]
            raise OpenAIError(400, f"Unrecognized request argument supplied: {name}", name, "unknown_parameter")
        if body["endpoint"] not in ENDPOINTS:
            raise OpenAIError(400, f"Invalid 'endpoint': llmq runs batches of {' and '.join(ENDPOINTS)}", "endpoint",
                              "invalid_value")
        if body["completion_window"] != COMPLETION_WINDOW:
            raise OpenAIError(400, "Invalid 'completion_window': only '24h' is supported", "completion_window",
                              "invalid_value")
        metadata = body.get("metadata")
        if metadata is not None and not (
                isinstance(metadata, dict) and len(metadata) <= MAX_METADATA_ITEMS
                and all(isinstance(k, str) and len(k) <= 64 and isinstance(v, str) and len(v) <= 512
                        for k, v in metadata.items())):
            raise OpenAIError(400, f"Invalid 'metadata': at most {MAX_METADATA_ITEMS} string pairs (keys up to 64 "
                              "characters, values up to 512)", "metadata", "invalid_value")
        return {"input_file_id": body["input_file_id"], "endpoint": body["endpoint"],
                "completion_window": COMPLETION_WINDOW, "metadata": json.dumps(metadata) if metadata else None,
                **_webhook_fields(body)}

    async def _check_webhook(self, url: str) -> None:
        """Refused now, not at the first delivery: a URL deliveries would be refused to (a
        loopback, private or link-local address, unless LLMQ_WEBHOOK_ALLOW_PRIVATE)."""
        try:
            await check_webhook_url(url, self.gateway.settings.webhook_allow_private)
        except WebhookUrlError as exc:
            raise OpenAIError(400, f"Invalid 'webhook': {exc}", "webhook", "invalid_value") from None

    async def _owned_batch(self, request: web.Request) -> dict[str, str]:
        gw = self.gateway
        tenant = await gw.authenticate(request)
        batch_id = request.match_info["id"]
        if not BATCH_ID.match(batch_id):
            raise _not_found("batch", batch_id)
        try:
            batch = await gw.batches.get(batch_id)
        except (RedisError, OSError) as exc:
            raise redis_down(exc) from exc
        if batch is None or (gw.settings.auth and batch.get("tenant") != tenant):
            raise _not_found("batch", batch_id)
        return batch

    async def get_batch(self, request: web.Request) -> web.Response:
        return web.json_response(batch_object(await self._owned_batch(request)))

    async def cancel_batch(self, request: web.Request) -> web.Response:
        batch = await self._owned_batch(request)
        gw = self.gateway
        try:
            await gw.batches.move(batch["id"], ["validating", "in_progress"], "cancelling",
                                  {"cancelling_at": time.time()})
            batch = await gw.batches.get(batch["id"])
        except (RedisError, OSError) as exc:
            raise redis_down(exc) from exc
        if batch["status"] not in ("cancelling", "cancelled"):
            raise OpenAIError(409, f"the batch already ended {batch['status']}; it can't be cancelled", None,
                              "batch_not_cancellable")
        gw.batch_runner.nudge()
        return web.json_response(batch_object(batch))

    async def list_batches(self, request: web.Request) -> web.Response:
        gw = self.gateway
        tenant = await gw.authenticate(request)
        try:
            batches, more = await gw.batches.page(tenant, request.query.get("after"), _limit(request, *_BATCH_PAGE))
        except (RedisError, OSError) as exc:
            raise redis_down(exc) from exc
        data = [batch_object(b) for b in batches]
        return web.json_response({"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                                  "last_id": data[-1]["id"] if data else None, "has_more": more})
