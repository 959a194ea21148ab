"""Webhooks, the parts every producer and the sender share: the event message
queued on the webhooks topic (typed, versioned), its production, Standard
Webhooks signing with a secret per API key, and the guard that keeps
deliveries off loopback, private and link-local addresses (SSRF).

Workers produce a request's events, the gateways' batch runner a batch's, with
the same calls; the sender (gateway/webhooks.py) delivers both.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import secrets
import socket
import time
from datetime import datetime, timezone
from typing import Any, Literal

import redis.asyncio as aioredis
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from aiokafka import AIOKafkaProducer
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError
from standardwebhooks import Webhook
from yarl import URL

from shared.kafka import JSON_HEADERS
from shared.keys import API_KEY_CACHE_SECONDS, Keys
from shared.schema import RequestView, WebhookEvent

EVENT_VERSION = 1
SECRET_PREFIX = "whsec_"  # the Standard Webhooks secret format: whsec_ + base64 of the key


# What an event is about; its delivery state is written on that subject's hash
# (Keys.webhook_state), and its payload's `type` is `{subject}.{event}`.
WebhookSubject = Literal["request", "batch"]


class WebhookEventMessage(BaseModel):
    """One delivery to make, as queued on the webhooks topic (key: the subject's id,
    so one request's, or one batch's, events stay in order on one partition).

    Version 1 grew `subject` compatibly: a message without it is a request's (as every
    message was before batches had webhooks), and a request's event is written
    without it, so that a sender from before reads it still. The wire name of the
    subject's id stays `request_id` for the same reason."""

    model_config = ConfigDict(extra="forbid", strict=True, title="llmq webhook event v1", validate_by_name=True,
                              validate_by_alias=True, serialize_by_alias=True)

    v: Literal[1] = EVENT_VERSION
    # The `webhook-id` header: the same on every redelivery, so receivers can dedupe.
    id: str = Field(max_length=200)
    type: WebhookEvent
    subject: WebhookSubject = "request"
    subject_id: str = Field(max_length=128, alias="request_id", description="The request's id, or the batch's.")
    url: str = Field(max_length=2048)
    tenant: str | None = Field(default=None, max_length=64, description="The API key whose secret signs it.")
    created_at: float = Field(description="When the event happened (Unix seconds).")
    data: dict[str, Any] = Field(description="The subject as `GET /v1/requests/{id}` (or `GET /v1/batches/{id}`) "
                                             "showed it then.")

    def body(self) -> bytes:
        """What is POSTed, in the Standard Webhooks payload shape: type, timestamp, data."""
        at = datetime.fromtimestamp(self.created_at, timezone.utc).isoformat().replace("+00:00", "Z")
        return json.dumps({"type": f"{self.subject}.{self.type}", "timestamp": at, "data": self.data},
                          separators=(",", ":")).encode()

    def to_bytes(self) -> bytes:
        return self.model_dump_json(exclude={"subject"} if self.subject == "request" else None).encode()

    def log_fields(self) -> dict[str, str]:
        """What a log line names it by: `request_id` or `batch_id`."""
        return {f"{self.subject}_id": self.subject_id}


class EventError(ValueError):
    """A webhooks-topic message that cannot be delivered: bad bytes, JSON or schema."""


def parse_event(value: bytes | None) -> WebhookEventMessage:
    if value is None:
        raise EventError("empty message")
    try:
        return WebhookEventMessage.model_validate_json(value)
    except ValidationError as exc:
        error = exc.errors()[0]
        raise EventError(f"{'.'.join(map(str, error['loc'])) or 'message'}: {error['msg']}") from exc


def _bounded(data: dict[str, Any], max_payload_bytes: int) -> dict[str, Any]:
    """The record, without its output text where that would make the payload larger than
    `max_payload_bytes` (`output.truncated`: the receiver reads the whole record over HTTP)."""
    if len(json.dumps(data)) <= max_payload_bytes or not isinstance(data.get("output"), dict):
        return data
    return {**data, "output": {**data["output"], "text": "", "truncated": True}}


class WebhookEvents:
    """Queues webhook events, for requests and batches that asked for them: the worker's
    `start` and `completed` of a request, the gateway's `completed` for a request it
    cancels, the batch runner's `start` and `completed` of a batch. One event may be
    queued twice (a redelivered request, a batch taken over); the sender delivers it once."""

    def __init__(self, producer: AIOKafkaProducer, topic: str, max_payload_bytes: int) -> None:
        self.producer = producer
        self.topic = topic
        self.max_payload_bytes = max_payload_bytes

    async def emit(self, kind: str, view: RequestView) -> bool:
        """Queue event `kind` of the request `view` shows, if its webhook asked for it, and
        wait for the broker's ack: only then is it handed on. False where none was asked for."""
        if view.webhook is None or kind not in view.webhook.events:
            return False
        await self.send("request", view.id, kind, view.webhook.url, view.tenant, json.loads(view.model_dump_json()))
        return True

    async def send(self, subject: WebhookSubject, subject_id: str, kind: str, url: str, tenant: str | None,
                   data: dict[str, Any]) -> None:
        """Queue event `kind` of a subject (`data`: as its GET shows it) and wait for the ack."""
        event = WebhookEventMessage(id=f"{subject_id}.{kind}", type=kind, subject=subject, subject_id=subject_id,
                                    url=url, tenant=tenant, created_at=time.time(),
                                    data=_bounded(data, self.max_payload_bytes))
        await self.producer.send_and_wait(self.topic, event.to_bytes(), key=subject_id.encode(), headers=JSON_HEADERS)


# ---- signing ---------------------------------------------------------------


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(24)).decode()


def signed_headers(secret: str, event_id: str, body: bytes, now: datetime | None = None) -> dict[str, str]:
    """The Standard Webhooks headers for one attempt, signed by the `standardwebhooks`
    package (the same code receivers verify with). A fresh timestamp per attempt: receivers
    refuse ones over 5 minutes old, and a retry may come hours after the event."""
    now = now or datetime.now(timezone.utc)
    return {
        "webhook-id": event_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": Webhook(secret).sign(event_id, now, body.decode()),
        "content-type": "application/json",
    }


class WebhookSecrets:
    """Each API key's signing secret, in Redis (made on first use, or with the key);
    with auth off, one deployment secret: LLMQ_WEBHOOK_SECRET, or one made once and kept
    in Redis so every gateway signs alike. Stored as they are (signing needs them), unlike
    API keys, which are kept hashed."""

    def __init__(self, redis: aioredis.Redis, keys: Keys, deployment_secret: SecretStr | None = None,
                 cache_seconds: float = API_KEY_CACHE_SECONDS) -> None:
        self.redis = redis
        self.keys = keys
        self.deployment_secret = deployment_secret
        self.cache_seconds = cache_seconds
        self._cache: dict[str, tuple[str, float]] = {}

    async def of(self, tenant: str | None) -> str:
        if tenant is None and self.deployment_secret is not None:
            return self.deployment_secret.get_secret_value()
        name = tenant or ""
        cached = self._cache.get(name)
        now = time.monotonic()
        if cached and cached[1] > now:
            return cached[0]
        key = self.keys.webhook_secret(name)
        await self.redis.set(key, new_secret(), nx=True)  # the first gateway to ask makes it
        secret = await self.redis.get(key)
        self._cache[name] = (secret, now + self.cache_seconds)
        return secret


# ---- where a webhook may point -----------------------------------------------


class WebhookUrlError(ValueError):
    """Why a webhook URL is refused; the same URL is refused every time."""


def _refusal(address: str) -> str | None:
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # an IPv6 zone id is not part of the address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for kind in ("loopback", "link_local", "private", "multicast", "unspecified", "reserved"):
        if getattr(ip, f"is_{kind}"):
            return kind.replace("_", "-")
    return None if ip.is_global else "non-public"


def _check_addresses(host: str, addresses: list[str]) -> None:
    for address in addresses:
        kind = _refusal(address)
        if kind is not None:
            raise WebhookUrlError(f"{host} is a {kind} address ({address}); webhooks go to public addresses "
                                  "only (LLMQ_WEBHOOK_ALLOW_PRIVATE=true allows others, for local development)")


async def check_webhook_url(url: str, allow_private: bool, timeout: float = 5.0) -> None:
    """Refuse a URL that is not http(s) with a host, or whose host is or resolves to a
    loopback, private, link-local, multicast, reserved or unspecified address (every
    address it resolves to must be public: one bad one is enough to reach inside)."""
    try:
        parsed = URL(url)
    except ValueError as exc:
        raise WebhookUrlError(f"not a URL ({exc})") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise WebhookUrlError("must be an http:// or https:// URL with a host")
    if parsed.user is not None or parsed.password is not None:
        raise WebhookUrlError("must not carry credentials (they would be logged and stored)")
    if allow_private:
        return
    host = parsed.host
    try:
        _check_addresses(host, [str(ipaddress.ip_address(host))])
        return
    except ValueError as exc:
        if isinstance(exc, WebhookUrlError):
            raise
    try:
        async with asyncio.timeout(timeout):
            infos = await asyncio.get_running_loop().getaddrinfo(host, parsed.port, type=socket.SOCK_STREAM)
    except (OSError, TimeoutError):
        raise WebhookUrlError(f"{host} does not resolve") from None
    _check_addresses(host, [info[4][0] for info in infos])


class GuardedResolver(AbstractResolver):
    """aiohttp's resolver, refusing non-public answers at connect time: the name may
    resolve elsewhere than when the URL was checked (DNS rebinding), and aiohttp connects
    to exactly the addresses this returns."""

    def __init__(self) -> None:
        self._resolver = DefaultResolver()

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        results = await self._resolver.resolve(host, port, family)
        try:
            _check_addresses(host, [r["host"] for r in results])
        except WebhookUrlError as exc:
            raise OSError(str(exc)) from None  # aiohttp reports an OSError here as a connection error
        return results

    async def close(self) -> None:
        await self._resolver.close()
