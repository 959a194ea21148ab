"""The `llmq submit | get | cancel | optimize` client: a running gateway's API from a shell.

Errors are one line on stderr and a non-zero exit: what failed and where, never
a traceback.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class ClientSettings(BaseSettings):
    """Where `llmq submit/get/cancel` find the gateway, and the key they send."""

    model_config = SettingsConfigDict(env_prefix="LLMQ_", extra="ignore")

    # The gateway's base URL; unset: http://127.0.0.1:$LLMQ_HTTP_PORT (8000).
    url: str | None = None
    http_port: int = Field(default=8000, ge=0, le=65535)
    # The API key sent as `Authorization: Bearer <key>` (`llmq keys create NAME` makes one).
    api_key: SecretStr | None = None

    @property
    def base_url(self) -> str:
        return (self.url or f"http://127.0.0.1:{self.http_port}").rstrip("/")


class ClientError(Exception):
    """What went wrong, in one line."""


class Client:
    def __init__(self, base_url: str, api_key: str | None, timeout: float = 70) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout

    def ready(self) -> bool:
        """The gateway answers /readyz with 200 (its Redis and broker are reachable)."""
        try:
            self._call("GET", "/readyz")
            return True
        except ClientError:
            return False

    def submit(self, body: dict) -> dict:
        return self._call("POST", "/v1/requests", body)

    def get(self, request_id: str, wait: float = 0) -> dict:
        query = f"?wait={wait:g}" if wait > 0 else ""
        return self._call("GET", f"/v1/requests/{urllib.parse.quote(request_id, safe='')}{query}")

    def wait_final(self, request_id: str, wait: float) -> dict:
        """The record once final, or as it is after `wait` seconds (the gateway caps each long-poll)."""
        deadline = time.monotonic() + wait
        while True:
            left = deadline - time.monotonic()
            view = self.get(request_id, wait=max(left, 0))
            if view["status"] not in ("queued", "running") or left <= 0:
                return view

    def cancel(self, request_id: str) -> dict:
        return self._call("DELETE", f"/v1/requests/{urllib.parse.quote(request_id, safe='')}")

    # ---- optimization jobs --------------------------------------------------------

    def create_optimization(self, body: dict) -> dict:
        return self._call("POST", "/v1/optimization/jobs", body)

    def optimization(self, job_id: str) -> dict:
        return self._call("GET", f"/v1/optimization/jobs/{urllib.parse.quote(job_id, safe='')}")

    def optimizations(self, limit: int = 20) -> list[dict]:
        return self._call("GET", f"/v1/optimization/jobs?limit={limit}")["data"]

    def cancel_optimization(self, job_id: str) -> dict:
        return self._call("POST", f"/v1/optimization/jobs/{urllib.parse.quote(job_id, safe='')}/cancel")

    def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        url = self.base_url + path
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as resp:
                return json.load(resp)
        except urllib.error.HTTPError as exc:
            raise ClientError(f"{method} {url}: {exc.code} {_error_text(exc)}") from None
        except urllib.error.URLError as exc:
            raise ClientError(f"cannot reach the gateway at {self.base_url} ({exc.reason}); is it running "
                              f"(`make up`)? Another address: --url or LLMQ_URL") from None
        except (TimeoutError, OSError) as exc:
            raise ClientError(f"{method} {url}: no answer ({exc})") from None
        except ValueError:
            raise ClientError(f"{method} {url}: the answer is not JSON; is that an llmq gateway?") from None


def _error_text(exc: urllib.error.HTTPError) -> str:
    """The gateway's error as `type: message`, or the HTTP reason for anything else."""
    try:
        error = json.load(exc)["error"]
        return f"{error['type']}: {error['message']}"
    except (ValueError, KeyError, TypeError):
        return str(exc.reason)
