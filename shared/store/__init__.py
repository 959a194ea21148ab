"""Request records in Redis, split by concern: the client (connection), the
Lua script behind each status transition (scripts), a new record's fields
(fields), the store's calls (records), batching script calls into one round
trip (pipelining), a record as clients see it (view), the model names workers
register (models), the answers of deterministic requests kept for their
repeats (cache), and batches with their lines (batches). Key names and
lifetimes are in shared/keys.py."""

from shared.store.connection import connect_redis
from shared.store.fields import base_fields
from shared.store.records import Admission, IdempotencyClaim, RequestStore

__all__ = ["Admission", "IdempotencyClaim", "RequestStore", "base_fields", "connect_redis"]
