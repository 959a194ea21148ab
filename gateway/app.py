"""The gateway's aiohttp application: `POST /v1/requests` records and enqueues,
`GET`/`DELETE /v1/requests/{id}` read and cancel, plus health, readiness,
metrics and the OpenAPI document.

A request is answered 202 only once Redis holds its record and the broker has
acknowledged its message; if either fails the client gets a 503 and nothing
is left half-written. An `Idempotency-Key` makes a retried submit answer with
the request it first admitted, and `Prefer: wait=N` holds the answer until the
request is final. A repeat of a deterministic request is answered from the
result cache (shared/store/cache.py) without the queue.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
import uuid
from contextlib import nullcontext
from datetime import datetime, timezone

import structlog
from aiohttp import web
from opentelemetry import trace
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from redis.exceptions import RedisError

from gateway.admission import (
    CACHE_BYPASS,
    CACHE_HIT,
    CACHE_MISS,
    IDEMPOTENCY_KEY,
    MAX_IDEMPOTENCY_KEY_CHARS,
    Admitted,
    cache_directives,
    fingerprint_of,
    preferred_wait,
)
from gateway.batches.files import FileStore
from gateway.batches.routes import PATHS as BULK_PATHS
from gateway.batches.routes import BulkRoutes
from gateway.batches.runner import BatchRunner
from gateway.errors import HTTP_ERROR_TYPES, ApiError, redis_down
from gateway.fine_tuning.routes import PATHS as FINE_TUNING_PATHS
from gateway.fine_tuning.routes import FineTuningRoutes
from gateway.fine_tuning.serving import AdapterConflict, FineTunedModels, NotYours
from gateway.optimization.routes import PATHS as OPTIMIZATION_PATHS
from gateway.optimization.routes import OptimizationRoutes
from gateway.metrics import GatewayMetrics
from gateway.openai_compat import OpenAIError
from gateway.openai_routes import PATHS as OPENAI_PATHS
from gateway.openai_routes import OpenAIRoutes, openai_error
from gateway.openapi import openapi_document
from gateway.pacing import InteractivePacer
from gateway.settings import GatewaySettings
from gateway.streaming import (
    KEEP_ALIVE,
    StreamGone,
    StreamHub,
    client_gone,
    follow,
    open_event_stream,
    sse_event,
    sse_json,
)
from gateway.waiter import CompletionWaiter
from gateway.webhooks import WebhookSender
from shared.apikeys import ApiKeyStore
from shared.kafka import JSON_HEADERS, ensure_topics, make_producer, start_with_retry
from shared.keys import Keys
from shared.lag import LagReader
from shared.schema import (
    REQUEST_ID_PATTERN,
    Lane,
    ModelCard,
    ModelList,
    RequestMessage,
    RequestSpec,
    RequestView,
    Status,
    SubmitRequest,
    describe_error,
)
from shared.store import IdempotencyClaim, RequestStore, base_fields, connect_redis
from shared.store.cache import CachedAnswer, ResultCache, answered_fields, cache_key
from shared.store.fine_tuning import TrainingStore
from shared.store.batches import BatchStore
from shared.store.models import ServedModels
from shared.store.streams import ENTRY_ID, TokenStreams, entry_key
from shared.telemetry import NO_TRACING, OFFSET, PARTITION, REQUEST_ID, Tracing
from shared.webhooks import WebhookEvents, WebhookSecrets, WebhookUrlError, check_webhook_url

log = structlog.get_logger(__name__)
_REQUEST_ID = re.compile(REQUEST_ID_PATTERN)
# The routes a client waits on for a generation (submit, wait, stream, the OpenAI calls),
# served ahead of the batch work this gateway runs (gateway/pacing.py).
INTERACTIVE_PATHS = frozenset({"/v1/requests", "/v1/requests/{id}", "/v1/requests/{id}/stream", *OPENAI_PATHS})


def _endpoint(request: web.Request) -> str:
    """The route's template (`/v1/requests/{id}`), so metrics and spans don't explode per id."""
    route = request.match_info.route.resource
    return route.canonical if route is not None else "unmatched"


class Gateway:
    """Owns the gateway's clients and handlers; `app` is what aiohttp serves."""

    def __init__(self, settings: GatewaySettings, tracing: Tracing = NO_TRACING) -> None:
        self.settings = settings
        self.metrics = GatewayMetrics()
        self.producer = None
        self.bulk_producer = None  # batch lines': a connection of their own (see _start)
        self.redis = None
        self.store: RequestStore | None = None
        self.streams: TokenStreams | None = None
        self.stream_hub: StreamHub | None = None
        self.waiter: CompletionWaiter | None = None
        self.api_keys: ApiKeyStore | None = None
        self.served_models: ServedModels | None = None
        self.cache: ResultCache | None = None
        # Chosen once: with LLMQ_CACHE_TTL_SECONDS=0 nothing is looked up.
        self._cached = self._cache_lookup if settings.cache_ttl_seconds else self._no_cache
        self.files = FileStore(settings.files_dir)
        self.batches: BatchStore | None = None
        self.training: TrainingStore | None = None
        self.fine_tuned: FineTunedModels | None = None
        self.batch_runner: BatchRunner | None = None
        # Interactive requests first: the batch runner rests while they are in flight here.
        self.pacer = InteractivePacer(settings.batch_busy_share)
        self._batch_loop: asyncio.Task | None = None
        self.webhook_events: WebhookEvents | None = None
        self.webhook_secrets: WebhookSecrets | None = None
        self.webhook_sender: WebhookSender | None = None
        self._webhook_sending: asyncio.Task | None = None
        self.queue_depth = 0  # the workers' lag, read by _watch_queue when LLMQ_MAX_QUEUE_DEPTH is set
        self._queue_watch: asyncio.Task | None = None
        # Chosen once at start-up (configure_tracing): a no-op without an OTLP endpoint.
        self.tracing = tracing
        self.app = web.Application(client_max_size=settings.max_body_bytes, middlewares=[self._middleware])
        self.app.add_routes([
            web.post("/v1/requests", self.submit),
            web.get("/v1/requests/{id}", self.get_request),
            web.get("/v1/requests/{id}/stream", self.stream_request),
            web.get("/v1/models", self.list_models),
            web.get("/v1/webhooks/secret", self.webhook_secret),
            web.delete("/v1/requests/{id}", self.cancel),
            web.get("/healthz", self.healthz),
            web.get("/readyz", self.readyz),
            web.get("/metrics", self.metrics_endpoint),
            web.get("/openapi.json", self.openapi),
            *OpenAIRoutes(self).routes(),
            *BulkRoutes(self).routes(),
            *FineTuningRoutes(self).routes(),
            *OptimizationRoutes(self).routes(),
        ])
        self.app.on_startup.append(self._start)
        self.app.on_cleanup.append(self._close)

    async def _start(self, _app: web.Application) -> None:
        s = self.settings
        self.redis = connect_redis(s.redis_url)
        self.store = RequestStore(self.redis, Keys.of(s))
        self.streams = TokenStreams(self.redis, self.store.keys)
        self.stream_hub = StreamHub(s.redis_url, self.store.keys, self.redis)
        self.waiter = CompletionWaiter(self.store)
        self.api_keys = ApiKeyStore(self.redis, self.store.keys)
        self.served_models = ServedModels(self.redis, self.store.keys)
        self.cache = ResultCache(self.redis, self.store.keys, s.cache_max_entries, s.cache_max_entry_bytes)
        self.webhook_secrets = WebhookSecrets(self.redis, self.store.keys, s.webhook_secret)
        if not s.auth:
            log.warning("auth_off", detail="LLMQ_AUTH=false: every client can read every request")
        self.producer = make_producer(s)
        await start_with_retry(self.producer, "producer")
        await ensure_topics(s)
        self.files.start()
        self.batches = BatchStore(self.redis, self.store.keys, s.batch_ttl_seconds)
        self.training = TrainingStore(self.redis, self.store.keys, s.training_ttl_seconds)
        self.fine_tuned = FineTunedModels(self.training, s.auth)
        self.webhook_events = WebhookEvents(self.producer, s.webhook_topic, s.webhook_max_payload_bytes)
        # Batch lines go out on a producer of their own: a producer sends one request at a
        # time to each broker, so a chunk of lines on the shared one would hold every
        # interactive submit behind it.
        self.bulk_producer = make_producer(s)
        await start_with_retry(self.bulk_producer, "bulk-producer")
        self.batch_runner = BatchRunner(s, self.batches, self.files, self.bulk_producer, self.served_models,
                                        self.metrics, self.webhook_events, self.fine_tuned, self.pacer)
        self._batch_loop = asyncio.create_task(self.batch_runner.run(), name="batch-runner")
        if s.webhook_sender:
            self.webhook_sender = WebhookSender(s, self.store, self.webhook_secrets, self.metrics)
            self._webhook_sending = asyncio.create_task(self.webhook_sender.run(), name="webhook-sender")
            self._webhook_sending.add_done_callback(self._webhook_sender_ended)
        if s.max_queue_depth:
            self._queue_watch = asyncio.create_task(self._watch_queue(), name="queue-watch")
        log.info("gateway_started", topic=s.request_topic, port=s.http_port)

    async def _watch_queue(self) -> None:
        """Keep `queue_depth` current for admission: the same lag the scaler reads
        (right on the dev broker too), once a second, off the request path."""
        reader = LagReader(self.settings)
        try:
            while True:
                try:
                    self.queue_depth = (await reader.read()).depth
                except Exception as exc:  # keep the last reading; the broker may be back soon
                    log.warning("queue_depth_unreadable", error=str(exc))
                await asyncio.sleep(1.0)
        finally:
            await reader.close()

    def _webhook_sender_ended(self, task: asyncio.Task) -> None:
        """The sender stopped on an error: say so (/readyz says so too, so the orchestrator restarts the gateway)."""
        if not task.cancelled() and task.exception() is not None:
            log.error("webhook_sender_failed", error=repr(task.exception()))

    async def _close(self, _app: web.Application) -> None:
        if self._batch_loop is not None:
            # It stops after its current chunk (cursor saved); a stuck one is cancelled,
            # and another gateway resumes from the saved cursor.
            self.batch_runner.close()
            try:
                async with asyncio.timeout(self.settings.produce_timeout_seconds * 5):
                    await asyncio.shield(self._batch_loop)
            except TimeoutError:
                self._batch_loop.cancel()
            await asyncio.gather(self._batch_loop, return_exceptions=True)
            self._batch_loop = None
        if self._webhook_sending is not None:
            self._webhook_sending.cancel()
            await asyncio.gather(self._webhook_sending, return_exceptions=True)
            await self.webhook_sender.close()
        if self._queue_watch is not None:
            self._queue_watch.cancel()
            await asyncio.gather(self._queue_watch, return_exceptions=True)
        if self.waiter is not None:
            await self.waiter.close()
        if self.stream_hub is not None:
            await self.stream_hub.close()
        for producer in (self.producer, self.bulk_producer):
            if producer is not None:
                await producer.stop()
        if self.redis is not None:
            await self.redis.aclose()

    @web.middleware
    async def _middleware(self, request: web.Request, handler) -> web.StreamResponse:
        """The server span, JSON errors and metrics, in one middleware so each sees
        the final status. Hand-written rather than opentelemetry's aiohttp-server
        instrumentation, which would be a second middleware timing the same thing."""
        endpoint = _endpoint(request)
        with (self.tracing.server_span(request.method, endpoint, request.headers) as span,
              self.pacer.interactive() if endpoint in INTERACTIVE_PATHS else nullcontext()):
            response = await self._answer(request, handler)
            span.set_attribute("http.response.status_code", response.status)
            if response.status >= 500:
                span.set_status(trace.StatusCode.ERROR)
            return response

    async def _answer(self, request: web.Request, handler) -> web.StreamResponse:
        started = time.perf_counter()
        structlog.contextvars.clear_contextvars()
        refused: ApiError | OpenAIError | None = None
        try:
            response = await handler(request)
        except (ApiError, OpenAIError) as exc:
            refused = exc
        except web.HTTPException as exc:
            allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None  # 405 says what would do
            refused = ApiError(exc.status, HTTP_ERROR_TYPES.get(exc.status, "http_error"), exc.reason, headers=allow)
        except Exception:
            log.exception("unhandled_error", path=request.path)
            refused = ApiError(500, "internal_error", "internal error")
        endpoint = _endpoint(request)
        if isinstance(refused, ApiError) and (endpoint in OPENAI_PATHS or endpoint in BULK_PATHS
                                             or endpoint in FINE_TUNING_PATHS or endpoint in OPTIMIZATION_PATHS):
            refused = openai_error(refused)  # OpenAI's clients read OpenAI's error shape
        if refused is not None:
            if isinstance(refused, OpenAIError):
                response = web.json_response(refused.body(), status=refused.status, headers=refused.headers)
                kind, field = refused.code, refused.param
            else:
                response = refused.response()
                kind, field = refused.type, refused.field
            # Which key was refused what, and why; never the body (a prompt is private).
            log.info("request_refused", status=refused.status, type=kind, field=field, method=request.method,
                     endpoint=endpoint)
        self.metrics.http_requests.labels(endpoint, request.method, str(response.status)).inc()
        self.metrics.http_duration.labels(endpoint, request.method).observe(time.perf_counter() - started)
        return response

    # ---- /v1/requests ----------------------------------------------------------

    async def authenticate(self, request: web.Request) -> str | None:
        """The caller's API key name; None when auth is off. 401 without a valid key."""
        if not self.settings.auth:
            return None
        scheme, _, key = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise ApiError(401, "unauthorized", "send an API key: `Authorization: Bearer <key>`",
                           headers={"WWW-Authenticate": "Bearer"})
        try:
            name = await self.api_keys.name_of(key.strip())
        except (RedisError, OSError) as exc:
            raise redis_down(exc) from exc
        if name is None:
            raise ApiError(401, "unauthorized", "the API key is unknown or revoked",
                           headers={"WWW-Authenticate": "Bearer"})
        structlog.contextvars.bind_contextvars(tenant=name)
        return name

    async def _owned_view(self, request: web.Request, request_id: str, view_of) -> RequestView:
        """The record if it exists and the caller owns it; 404 otherwise (no existence leak)."""
        tenant = await self.authenticate(request)
        try:
            view = await view_of()
        except (RedisError, OSError) as exc:
            raise redis_down(exc) from exc
        if view is None or (self.settings.auth and view.tenant != tenant):
            raise ApiError(404, "not_found", "no such request")
        return view

    async def submit(self, request: web.Request) -> web.Response:
        # 1) authenticate, then validate: content type, size, JSON, schema, configured limits
        tenant = await self.authenticate(request)
        body = await self.route_model(self._validate(await self.read_body(request)), tenant)
        if body.model is not None:
            await self.check_served(body.model)

        # 2) admit it; 3) answer, once it is final if `Prefer: wait` asks. Only a request
        # with an Idempotency-Key needs a fingerprint (a serialisation and a hash).
        fingerprint = fingerprint_of(body) if IDEMPOTENCY_KEY in request.headers else ""
        admitted = await self.admit(request, body, tenant, fingerprint, body.id, body.lane)
        return await self._accepted(request, admitted)

    async def admit(self, request: web.Request, spec: RequestSpec, tenant: str | None, fingerprint: str,
                    request_id: str | None = None, lane: Lane = "interactive") -> Admitted:
        """Everything after validation, the same for every endpoint that submits: the
        queue's bound, the Idempotency-Key, the key's rate, the record, the message
        (to the lane's topic). `fingerprint` is what a retry with the same
        Idempotency-Key must repeat (read only when the request has one). Raises ApiError.

        A repeat of a deterministic request found in the result cache is recorded final
        at once and never enqueued, so the queue's bound doesn't refuse it; it is still
        held to the Idempotency-Key and to the key's rate (it is a request like any other,
        and the rate also protects the gateway and Redis)."""
        idempotency = self._idempotency(request, fingerprint)
        if spec.webhook is not None:
            await self.check_webhook(spec.webhook)
        directives = cache_directives(request)
        cache_status, answer = await self._cached(spec, tenant, directives)
        if answer is None and self.settings.max_queue_depth and self.queue_depth >= self.settings.max_queue_depth:
            raise ApiError(429, "queue_full", f"the queue holds {self.queue_depth} requests; try again later",
                           headers={"Retry-After": "5"})

        # Record it (unless its Idempotency-Key admitted one before), then enqueue it;
        # undo the record if the broker won't take it.
        request_id = request_id or uuid.uuid4().hex
        submitted_at = time.time()
        trace.get_current_span().set_attribute(REQUEST_ID, request_id)
        structlog.contextvars.bind_contextvars(request_id=request_id)
        rate = self.settings.rate_limit_rps if self.settings.auth else 0.0
        fields = base_fields(request_id, spec, submitted_at, "http", tenant, lane)
        if "no-store" in directives:
            fields["no_store"] = 1  # read by the worker's cache fill
        if answer is not None:
            fields.update(answered_fields(answer, submitted_at))
        try:
            admission = await self.store.create(fields, rate, self.settings.rate_limit_burst, idempotency)
        except (RedisError, OSError) as exc:
            raise redis_down(exc) from exc
        if admission.outcome == "replay":
            return await self._replayed(request, spec, tenant, idempotency, request_id, admission.request_id, lane)
        if admission.outcome == "key_reused":
            raise ApiError(422, "idempotency_key_reused", "Idempotency-Key: already used with another body; "
                           "send a new key with a new request", IDEMPOTENCY_KEY)
        if admission.outcome == "rate_limited":
            raise ApiError(429, "rate_limited", f"over {self.settings.rate_limit_rps:g} requests per second for this key",
                           headers={"Retry-After": str(max(1, math.ceil(admission.retry_after)))})
        if admission.outcome == "id_in_use":
            # The same answer whoever owns it: nothing of another key's request is read or shown.
            raise ApiError(409, "id_in_use", "a request with this id already exists; choose another id", "id")
        if answer is not None:
            log.info("request_answered_from_cache")
            return Admitted(request_id, status=Status.succeeded, cache_status=cache_status)
        # Already validated: construct without validating a second time on the hot path.
        message = RequestMessage.model_construct(
            v=1, id=request_id, tenant=tenant, submitted_at=datetime.fromtimestamp(submitted_at, timezone.utc),
            **{name: getattr(spec, name) for name in RequestSpec.model_fields},
        )
        try:
            await self._publish(request_id, message.to_bytes(), lane)
        except Exception as exc:
            log.warning("broker_unavailable", request_id=request_id, error=repr(exc))
            try:
                # Cancelled, not deleted: a produce that timed out may still reach the
                # broker (one that was paused or slow answers later), and a worker would
                # then recreate a deleted record and run a request the client was told
                # was refused. A cancelled record is final, so workers skip it.
                await self.store.cancel(request_id)
                if idempotency is not None:
                    # Told that nothing was accepted, the client may retry with the same key.
                    await self.store.release_idempotency(tenant, idempotency)
            except (RedisError, OSError):
                log.warning("record_cleanup_failed", request_id=request_id)
            raise ApiError(503, "broker_unavailable", "the queue is unreachable; the request was not accepted",
                           headers={"Retry-After": "1"}) from exc
        self.metrics.enqueued.inc()
        return Admitted(request_id, cache_status=cache_status)

    async def _cache_lookup(self, spec: RequestSpec, tenant: str | None,
                            directives: frozenset[str]) -> tuple[str | None, CachedAnswer | None]:
        """The result cache's answer to this request, if it has one and may give it,
        with the `Cache-Status` that says what happened."""
        key = cache_key(spec, tenant)
        # A request with a webhook runs on a worker, which sends its events; its answer
        # still fills the cache for repeats without one.
        if key is None or directives or spec.webhook is not None:
            self.metrics.cache_lookups.labels("uncacheable" if key is None else "bypass").inc()
            return (None if key is None else CACHE_BYPASS), None
        try:
            answer = await self.cache.lookup(tenant, key)
        except (RedisError, OSError) as exc:
            raise redis_down(exc) from exc
        self.metrics.cache_lookups.labels("miss" if answer is None else "hit").inc()
        return (CACHE_MISS if answer is None else CACHE_HIT), answer

    @staticmethod
    async def _no_cache(_spec: RequestSpec, _tenant: str | None, _directives: frozenset[str]) -> tuple[None, None]:
        return None, None

    def _idempotency(self, request: web.Request, fingerprint: str) -> IdempotencyClaim | None:
        key = request.headers.get(IDEMPOTENCY_KEY)
        if key is None:
            return None
        if not 0 < len(key) <= MAX_IDEMPOTENCY_KEY_CHARS:
            raise ApiError(422, "invalid_request", f"Idempotency-Key: must be 1 to {MAX_IDEMPOTENCY_KEY_CHARS} "
                           "characters", IDEMPOTENCY_KEY)
        return IdempotencyClaim(key, fingerprint, self.settings.idempotency_window_seconds)

    async def _replayed(self, request: web.Request, spec: RequestSpec, tenant: str | None,
                        idempotency: IdempotencyClaim, request_id: str, replayed_id: str, lane: Lane) -> Admitted:
        """The request an Idempotency-Key admitted before, as it is now."""
        trace.get_current_span().set_attribute(REQUEST_ID, replayed_id)
        structlog.contextvars.bind_contextvars(request_id=replayed_id)
        try:
            view = await self.store.get(replayed_id)
            if view is None:
                # Its record expired before the key did (a window longer than the records'
                # TTL): the key names nothing any more, so it admits this request.
                await self.store.release_idempotency(tenant, idempotency)
        except (RedisError, OSError) as exc:
            raise redis_down(exc) from exc
        if view is None:
            return await self.admit(request, spec, tenant, idempotency.fingerprint, request_id, lane)
        log.info("request_replayed")
        return Admitted(replayed_id, replayed=True, status=view.status)

    async def _accepted(self, request: web.Request, admitted: Admitted) -> web.Response:
        """202 with where to read the request; 200 with the record if `Prefer: wait=N`
        asked to wait and it finished in time."""
        status_url = f"/v1/requests/{admitted.id}"
        headers = {"Location": status_url, **admitted.headers}
        if admitted.replayed:
            headers["Idempotent-Replayed"] = "true"
        status = admitted.status
        wait = min(preferred_wait(request) or 0.0, self.settings.max_wait_seconds)
        if wait > 0:
            headers["Preference-Applied"] = f"wait={wait:g}"
            try:
                view = await self.waiter.wait(admitted.id, wait)
            except (RedisError, OSError) as exc:
                # Accepted already: a 503 now would tell the client it was not.
                log.warning("wait_failed", error=str(exc))
                view = None
            if view is not None and view.status.is_final:
                return web.json_response(text=view.model_dump_json(), headers=headers)
            status = view.status if view is not None else status
        body = {"id": admitted.id, "status": status.value, "status_url": status_url}
        return web.json_response(body, status=202, headers=headers)

    async def _publish(self, request_id: str, value: bytes, lane: Lane) -> None:
        """Produce the message to its lane's topic and wait for the broker's ack, in a
        PRODUCER span whose context travels in the message headers."""
        await self.produce(self.settings.bulk_topic_name if lane == "bulk" else self.settings.request_topic,
                           request_id, value)

    async def produce(self, topic: str, key: str, value: bytes) -> None:
        """Produce one message keyed `key` and wait for the broker's ack, in a PRODUCER span
        whose context travels in the message headers (requests and fine-tuning jobs alike)."""
        with self.tracing.producer_span(topic, key) as span:
            sent = await self._send(topic, key, value, self.tracing.inject(JSON_HEADERS, span))
            span.set_attributes({PARTITION: str(sent.partition), OFFSET: sent.offset})

    async def _send(self, topic: str, request_id: str, value: bytes, headers: list):
        # asyncio.timeout, not wait_for: wait_for makes a Task per call.
        async with asyncio.timeout(self.settings.produce_timeout_seconds):
            return await self.producer.send_and_wait(topic, value, key=request_id.encode(), headers=headers)

    async def read_body(self, request: web.Request) -> bytes:
        """A JSON body within the size limit (415, 413 otherwise)."""
        if request.content_type != "application/json":
            raise ApiError(415, "unsupported_media_type", "send the body as application/json")
        if (request.content_length or 0) > self.settings.max_body_bytes:
            # From the header alone: don't hold the connection for a body we'd refuse.
            raise ApiError(413, "body_too_large", f"the body is over the limit of {self.settings.max_body_bytes} bytes")
        return await request.read()

    def _validate(self, body: bytes) -> SubmitRequest:
        try:
            spec = SubmitRequest.model_validate_json(body)
        except ValidationError as exc:
            first = exc.errors()[0]
            if first["type"] == "json_invalid":
                raise ApiError(400, "invalid_json", "the body is not valid JSON") from None
            field, message = describe_error(first)
            raise ApiError(422, "invalid_request", f"{field or 'body'}: {message}", field or None) from None
        over = spec.over_limits(self.settings.max_prompt_chars, self.settings.max_tokens_limit)
        if over is not None:
            raise ApiError(413 if over.type == "prompt_too_large" else 422, over.type, over.message, over.field)
        if spec.deadline is not None and spec.deadline.timestamp() <= time.time():
            raise ApiError(422, "invalid_request", "deadline: already passed; no worker could start it in time",
                           "deadline")
        return spec

    async def check_webhook(self, url: str) -> None:
        """422 for a webhook URL deliveries would be refused to (a loopback, private or
        link-local address, unless LLMQ_WEBHOOK_ALLOW_PRIVATE): said now, not after the run."""
        try:
            await check_webhook_url(url, self.settings.webhook_allow_private)
        except WebhookUrlError as exc:
            raise ApiError(422, "invalid_request", f"webhook: {exc}", "webhook") from None

    async def webhook_completed(self, request_id: str) -> None:
        """Queue the `completed` webhook event of a request this gateway ended (cancelled);
        a worker queues it for every other end. Never fails the call that ended it."""
        try:
            view = await self.store.get(request_id)
            if view is not None:
                await self.webhook_events.emit("completed", view)
        except Exception as exc:  # noqa: BLE001 - the cancel stands; the event is what is lost
            log.warning("webhook_event_failed", request_id=request_id, webhook_event="completed", error=repr(exc))

    async def check_served(self, model: str) -> None:
        """422 for a model no worker serves: it could only fail once a worker took it."""
        try:
            served = await self.served_models.serves(model)
        except (RedisError, OSError) as exc:
            raise redis_down(exc) from exc
        if not served:
            raise await self._model_not_found(model)

    async def _model_not_found(self, model: str) -> ApiError:
        names = ", ".join(sorted(await self.served_models.names()))
        return ApiError(422, "model_not_found", f"model {model!r} is not served here (served: {names})", "model")

    async def route_model(self, spec: RequestSpec, tenant: str | None) -> RequestSpec:
        """The spec as workers run it: a published fine-tuned model of the caller's key as
        its base model plus `adapter` (gateway/fine_tuning/serving.py). Another key's
        fine-tuned model is refused as a model nobody serves is, in the same words."""
        try:
            return await self.fine_tuned.resolve(spec, tenant)
        except (RedisError, OSError) as exc:
            raise redis_down(exc) from exc
        except NotYours:
            raise await self._model_not_found(spec.model) from None
        except AdapterConflict:
            raise ApiError(422, "invalid_request", f"adapter: {spec.model!r} is a fine-tuned model and brings its own "
                           "adapter; name the fine-tuned model or an adapter, not both", "adapter") from None

    @staticmethod
    def _request_id(request: web.Request) -> str:
        request_id = request.match_info["id"]
        if not _REQUEST_ID.match(request_id):
            raise ApiError(404, "not_found", "no such request")
        return request_id

    async def get_request(self, request: web.Request) -> web.Response:
        request_id = self._request_id(request)
        trace.get_current_span().set_attribute(REQUEST_ID, request_id)
        wait = self._wait_seconds(request)
        if wait > 0:
            view = await self._owned_view(request, request_id, lambda: self.waiter.wait(request_id, wait))
        else:
            view = await self._owned_view(request, request_id, lambda: self.store.get(request_id))
        return web.json_response(text=view.model_dump_json())

    def _wait_seconds(self, request: web.Request) -> float:
        raw = request.query.get("wait")
        if raw is None:
            return 0.0
        try:
            wait = float(raw)
        except ValueError:
            wait = -1.0
        if not 0 <= wait < float("inf"):
            raise ApiError(422, "invalid_request", "wait: must be a non-negative number of seconds", "wait")
        return min(wait, self.settings.max_wait_seconds)

    async def stream_request(self, request: web.Request) -> web.StreamResponse:
        """The request's text as it is generated, as Server-Sent Events: `delta` events
        ({"text"}: new text), `reset` ({"text"}: the whole text so far, replacing what was
        received), then `done` with the final record. Each event has an id: reconnecting
        with `Last-Event-ID` resumes after it."""
        request_id = self._request_id(request)
        trace.get_current_span().set_attribute(REQUEST_ID, request_id)
        await self._owned_view(request, request_id, lambda: self.store.get(request_id))
        try:
            if not await self.streams.attach(request_id):
                raise ApiError(404, "not_found", "no such request")  # expired in between
            after, position, ended = await self._resume_point(request_id, request.headers.get("Last-Event-ID"))
        except (RedisError, OSError) as exc:
            raise redis_down(exc) from exc
        response = await open_event_stream(request)
        try:
            if ended:
                await self._write_done(response, request_id, after)
                return response
            async for piece in follow(self.streams, self.stream_hub, request_id, after, position):
                if piece.kind == "idle":
                    if client_gone(request):
                        return response
                    await response.write(KEEP_ALIVE)
                elif piece.kind == "end":
                    await self._write_done(response, request_id, piece.id)
                else:
                    await response.write(sse_json({"text": piece.text}, piece.kind, piece.id))
        except ConnectionResetError:
            return response  # the client went away; it may come back with Last-Event-ID
        except (RedisError, OSError, StreamGone) as exc:
            log.warning("stream_lost", request_id=request_id, error=repr(exc))
            await response.write(sse_json({"error": {
                "type": "stream_lost", "message": "the token stream was lost (the result store restarted or it "
                                                  "expired); reconnect to resume, or read the record"}}, "error"))
        return response

    async def _resume_point(self, request_id: str, last_event_id: str | None) -> tuple[str, int | None, bool]:
        """Where a stream read starts: (after this entry, holding this many bytes of the
        text (None: unknown), the request already ended there)."""
        if last_event_id is None:
            return "0-0", 0, False
        if not ENTRY_ID.match(last_event_id):
            raise ApiError(400, "invalid_last_event_id", "Last-Event-ID: not an event id this stream sent",
                           "Last-Event-ID")
        entry = await self.streams.entry(request_id, last_event_id)
        if entry is not None:
            return last_event_id, entry.at + len(entry.delta.encode()), entry.end is not None
        first = await self.streams.first_id(request_id)
        if first is not None and entry_key(last_event_id) < entry_key(first):
            return last_event_id, None, False  # trimmed away (or from an expired stream): start from the text so far
        raise ApiError(400, "invalid_last_event_id", "Last-Event-ID: not an event id this stream sent",
                       "Last-Event-ID")

    async def _write_done(self, response: web.StreamResponse, request_id: str, event_id: str | None) -> None:
        view = await self.store.get(request_id)
        if view is None:
            await response.write(sse_json({"error": {"type": "not_found", "message": "the record expired"}}, "error"))
        else:
            await response.write(sse_event(view.model_dump_json(), "done", event_id))

    async def cancel(self, request: web.Request) -> web.Response:
        request_id = self._request_id(request)
        trace.get_current_span().set_attribute(REQUEST_ID, request_id)
        await self._owned_view(request, request_id, lambda: self.store.get(request_id))
        try:
            await self.store.cancel(request_id)
            view = await self.store.get(request_id)
        except (RedisError, OSError) as exc:
            raise redis_down(exc) from exc
        if view is None:  # expired in between
            raise ApiError(404, "not_found", "no such request")
        if view.status is not Status.cancelled:
            raise ApiError(409, "already_finished", f"the request already ended {view.status.value}")
        log.info("request_cancelled", request_id=request_id)
        await self.webhook_completed(request_id)
        return web.json_response(text=view.model_dump_json())

    # ---- operations ------------------------------------------------------------

    async def list_models(self, request: web.Request) -> web.Response:
        """The models the workers serve (what `model` may name), in OpenAI's shape, so
        OpenAI clients can list them; registered by workers, so listed at zero workers too;
        and the caller's published fine-tuned models."""
        tenant = await self.authenticate(request)
        try:
            registered = await self.served_models.registered()
            fine_tuned, others = await self.fine_tuned.listing(tenant)
        except (RedisError, OSError) as exc:
            raise redis_down(exc) from exc
        cards = [ModelCard(id=name, created=int(at)) for name, at in sorted(registered.items()) if name not in others]
        # The caller's own fine-tuned models (with auth off, every one), owned by its key as OpenAI's are by an org.
        cards += [ModelCard(id=m.name, created=m.created_at, owned_by=m.tenant or "llmq") for m in fine_tuned
                  if m.name not in registered]
        return web.json_response(text=ModelList(data=cards).model_dump_json())

    async def webhook_secret(self, request: web.Request) -> web.Response:
        """The secret that signs the calling key's webhooks (with auth off, the deployment's),
        to verify deliveries with (Standard Webhooks)."""
        tenant = await self.authenticate(request)
        try:
            secret = await self.webhook_secrets.of(tenant)
        except (RedisError, OSError) as exc:
            raise redis_down(exc) from exc
        return web.json_response({"secret": secret}, headers={"Cache-Control": "no-store"})

    async def healthz(self, _request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, _request: web.Request) -> web.Response:
        checks = {"redis": "ok", "kafka": "ok"}
        sending = self._webhook_sending
        if sending is not None and sending.done():
            failed = None if sending.cancelled() else sending.exception()
            checks["webhooks"] = f"sender failed: {failed!r}" if failed else "sender stopped"
        try:
            await asyncio.wait_for(self.redis.ping(), 2)
        except Exception as exc:
            checks["redis"] = f"unreachable: {type(exc).__name__}"
        try:
            if not await asyncio.wait_for(self.producer.client.force_metadata_update(), 2):
                checks["kafka"] = "unreachable"
        except Exception as exc:
            checks["kafka"] = f"unreachable: {type(exc).__name__}"
        ready = all(v == "ok" for v in checks.values())
        return web.json_response({"status": "ready" if ready else "unavailable", "checks": checks},
                                 status=200 if ready else 503)

    async def metrics_endpoint(self, _request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def openapi(self, _request: web.Request) -> web.Response:
        return web.Response(text=json.dumps(openapi_document(self.settings.auth)), content_type="application/json")
