"""What admitting a request needs besides the gateway's clients: the
`Idempotency-Key`, `Prefer: wait` and `Cache-Control` headers read, a body's
fingerprint, and what an admission answers (gateway/app.py `Gateway.admit`,
used by every endpoint that submits)."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from aiohttp import web

from shared.schema import RequestSpec, Status

# The IETF httpapi Idempotency-Key draft: a retry with the same key answers with
# the request the key first admitted; the same key with another body is refused
# with 422. Bounded so that a key is no more than an opaque id.
IDEMPOTENCY_KEY = "Idempotency-Key"
MAX_IDEMPOTENCY_KEY_CHARS = 255
# RFC 7240's `wait` preference is delta-seconds; a fraction is read too.
_WAIT_SECONDS = re.compile(r"[0-9]+(?:\.[0-9]+)?")


def fingerprint_of(spec: RequestSpec) -> str:
    """What an Idempotency-Key's retries must repeat: the validated body, so that
    whitespace, key order and spellings pydantic normalises don't count."""
    return hashlib.sha256(spec.model_dump_json().encode()).hexdigest()


def preferred_wait(request: web.Request) -> float | None:
    """The seconds of `Prefer: wait=N` (RFC 7240), or None. As the RFC asks, a
    preference that is absent or can't be read is ignored, not refused, and only
    its first instance counts."""
    for header in request.headers.getall("Prefer", ()):
        for preference in header.split(","):
            name, _, value = preference.split(";", 1)[0].partition("=")
            if name.strip().lower() == "wait":
                value = value.strip().strip('"')
                return float(value) if _WAIT_SECONDS.fullmatch(value) else None
    return None


def cache_directives(request: web.Request) -> frozenset[str]:
    """The request's `Cache-Control` directives the result cache heeds (RFC 9111):
    `no-cache` (answer it afresh) and `no-store` (afresh, and keep nothing of it)."""
    return frozenset(directive.split("=", 1)[0].strip().lower()
                     for header in request.headers.getall("Cache-Control", ())
                     for directive in header.split(",")) & {"no-cache", "no-store"}


# RFC 9211 `Cache-Status` values: answered from the result cache; looked up and not
# found; not looked up (the client asked for a fresh answer, or a sampled request).
CACHE_HIT = "llmq; hit"
CACHE_MISS = "llmq; fwd=uri-miss"
CACHE_BYPASS = "llmq; fwd=bypass"


@dataclass(frozen=True)
class Admitted:
    """A request the queue holds, or one answered from the result cache: new, or the
    one its Idempotency-Key admitted before."""

    id: str
    replayed: bool = False
    status: Status = Status.queued  # a replayed one's status when it was looked up
    cache_status: str | None = None  # the `Cache-Status` header, where the result cache was asked

    @property
    def headers(self) -> dict[str, str]:
        """What every endpoint's answer says about how it was admitted."""
        return {"Cache-Status": self.cache_status} if self.cache_status else {}
