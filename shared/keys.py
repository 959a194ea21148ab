"""Every Redis key and channel llmq uses, in one place.

A request record is one hash `{prefix}:req:{id}`, expiring `result_ttl_seconds`
(Settings, default 24 h) after its last change. Finished requests are
announced on the channel `{prefix}:done` (message: the id) so long-polls wake
without busy polling; cancelled ones also on `{prefix}:cancelled`, so the
worker running one stops it. API keys live in the hash `{prefix}:apikeys` (SHA-256 of
the key → its name and creation time; no expiry), and each key's rate-limit
token bucket in `{prefix}:ratelimit:{name}` (expires once full again).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    prefix: str = "llmq"

    def request(self, request_id: str) -> str:
        return f"{self.prefix}:req:{request_id}"

    @property
    def done_channel(self) -> str:
        return f"{self.prefix}:done"

    @property
    def cancel_channel(self) -> str:
        return f"{self.prefix}:cancelled"

    @property
    def api_keys(self) -> str:
        return f"{self.prefix}:apikeys"

    def rate_limit(self, tenant: str) -> str:
        return f"{self.prefix}:ratelimit:{tenant}"
