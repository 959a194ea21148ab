"""Every error the API returns is JSON: {"error": {"type", "message", "field"}}."""

from __future__ import annotations

import json

import structlog
from aiohttp import web

log = structlog.get_logger(__name__)


class ApiError(Exception):
    def __init__(self, status: int, type_: str, message: str, field: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.type = type_
        self.message = message
        self.field = field
        self.headers = headers or {}

    def response(self) -> web.Response:
        return error_response(self.status, self.type, self.message, self.field, self.headers)


def error_response(status: int, type_: str, message: str, field: str | None = None,
                   headers: dict[str, str] | None = None) -> web.Response:
    error = {"type": type_, "message": message}
    if field is not None:
        error["field"] = field
    return web.Response(status=status, text=json.dumps({"error": error}), content_type="application/json",
                        headers=headers)


# aiohttp's own HTTP errors (no such route, wrong method, body over client_max_size) as typed JSON.
HTTP_ERROR_TYPES = {
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
}


def redis_down(exc: Exception) -> ApiError:
    log.warning("redis_unavailable", error=str(exc))
    return ApiError(503, "redis_unavailable", "the result store is unreachable; try again shortly",
                    headers={"Retry-After": "1"})
