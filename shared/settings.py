"""Settings, declared once, typed, with their defaults, grouped by the process
that reads them: what every llmq process reads is here (`ServiceSettings`:
Kafka, Redis, topics, records, logs); each process adds its own in its own
package (gateway/settings.py, workers/settings.py, scaler/settings.py).

Read from `LLMQ_*` environment variables (pydantic-settings). A field marked
`cli("--flag")` is also a command-line flag of the process, which wins over
the environment: `parse_settings` builds every process's flags the same way.
"""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict


def cli(flag: str) -> dict[str, str]:
    """Field metadata making a setting a command-line flag too: `Field(..., json_schema_extra=cli("--port"))`."""
    return {"flag": flag}


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LLMQ_", extra="ignore", populate_by_name=True)

    # --- Kafka ----------------------------------------------------------------
    # Kafka bootstrap servers, comma-separated host:port.
    kafka_bootstrap: str = Field(default="127.0.0.1:9092", json_schema_extra=cli("--kafka-bootstrap"))
    # How every Kafka client authenticates, passed to aiokafka as they are:
    # SASL_SSL with SCRAM for a managed cluster, SSL for mutual TLS.
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "PLAIN"
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    # CA bundle that signed the brokers' certificates (SSL, SASL_SSL); unset: the system's.
    kafka_ssl_cafile: str | None = None
    # Client certificate and key, for brokers that require mutual TLS.
    kafka_ssl_certfile: str | None = None
    kafka_ssl_keyfile: str | None = None
    # Topic the gateway produces to and workers consume from.
    request_topic: str = Field(default="llmq.requests", json_schema_extra=cli("--request-topic"))
    # Topic of the bulk lane (batch lines, requests marked `"lane": "bulk"`), read by the
    # same workers after the request topic. Unset: the request topic's name + ".bulk".
    bulk_topic: str | None = None
    # Where unparseable or schema-invalid request messages go, with the reason.
    dlq_topic: str = "llmq.requests.dlq"
    # Partitions of the request topic when llmq creates it (caps useful workers).
    request_partitions: int = Field(default=8, ge=1)
    # Kafka consumer group shared by all workers.
    consumer_group: str = Field(default="llmq-workers", json_schema_extra=cli("--consumer-group"))
    # How long a produce (a submit, a dead letter, a reply) waits for the broker's ack.
    produce_timeout_seconds: float = Field(default=5.0, gt=0)
    # Producer batching delay. 0: a request is answered only after its ack, so any
    # linger is added latency; under load records batch anyway while a send is in flight.
    producer_linger_ms: int = Field(default=0, ge=0)

    # Topic of webhook events (key: the request id, so one request's events stay in order),
    # produced by workers and read by the gateways' webhook senders.
    webhook_topic: str = "llmq.webhooks"
    # Where webhook deliveries given up (retried for LLMQ_WEBHOOK_RETRY_SECONDS, or refused) go, with the reason.
    webhook_dlq_topic: str = "llmq.webhooks.dlq"
    # Largest webhook payload, bytes: an output text that would make it larger is left out (`output.truncated`).
    webhook_max_payload_bytes: int = Field(default=262_144, ge=4096)

    # Topic of fine-tuning jobs (key: the job id), produced by gateways and read by trainers.
    fine_tuning_topic: str = "llmq.fine_tuning"
    # Kafka consumer group shared by all trainers (the fine-tuning topic's readers).
    trainer_group: str = "llmq-trainers"
    # Partitions of the fine-tuning topic when llmq creates it (caps useful trainers).
    fine_tuning_partitions: int = Field(default=4, ge=1)

    # --- shared storage -------------------------------------------------------
    # Where uploaded files (batch inputs, fine-tuning data) and batch outputs live, each with its
    # metadata beside it. Gateways and trainers must share it (NFS, EFS, CephFS; ReadWriteMany
    # in Kubernetes).
    files_dir: Path = Field(default=Path(".llmq/files"), json_schema_extra=cli("--files-dir"))
    # Where trainers publish fine-tuned models (adapters/ and models/, with each one's
    # metadata beside it) and workers load them from: shared by trainers and workers.
    registry_dir: Path = Field(default=Path(".llmq/registry"), json_schema_extra=cli("--registry-dir"))

    # --- Redis ----------------------------------------------------------------
    # Redis URL for request records and completion notifications.
    redis_url: str = Field(default="redis://127.0.0.1:6379/0", json_schema_extra=cli("--redis-url"))
    # Prefix of every Redis key llmq writes (see shared/keys.py).
    redis_prefix: str = "llmq"
    # How long a request record (and its result) stays readable in Redis.
    result_ttl_seconds: int = Field(default=86_400, ge=1)
    # How long a watched request's token stream (SSE, and resuming one) stays in Redis after its last entry.
    stream_ttl_seconds: int = Field(default=3_600, ge=1)
    # How long a fine-tuning job's record, events and checkpoints list stay in Redis after its last change.
    training_ttl_seconds: int = Field(default=30 * 86_400, ge=1)
    # Most entries a token stream keeps (each one write's worth of deltas); a reader that falls
    # further behind gets what it missed from the record's text, so the worker never waits for it.
    stream_max_entries: int = Field(default=4_096, ge=16)

    # --- result cache (shared/store/cache.py): the gateway looks up, workers fill --
    # How long a deterministic request's answer (temperature 0, or a seed) is reused for a
    # repeat of it by the same API key. 0: no cache (nothing looked up or stored).
    cache_ttl_seconds: int = Field(default=3_600, ge=0)
    # Most answers kept per API key; storing one more drops the oldest.
    cache_max_entries: int = Field(default=1_000, ge=1)
    # Answers with more text than this (UTF-8 bytes) are not kept.
    cache_max_entry_bytes: int = Field(default=65_536, ge=1)

    # --- limits every request is held to, over HTTP and on Kafka alike --------
    # Longest prompt (or sum of chat message contents), characters (HTTP: 413 above it).
    max_prompt_chars: int = Field(default=32_768, ge=1)
    # Largest params.max_tokens (HTTP: 422 above it).
    max_tokens_limit: int = Field(default=4096, ge=1)

    # --- logs -----------------------------------------------------------------
    log_level: str = "info"
    # "auto" writes readable lines on a terminal and JSON lines otherwise.
    log_format: Literal["auto", "json", "console"] = "auto"

    @property
    def bulk_topic_name(self) -> str:
        return self.bulk_topic or f"{self.request_topic}.bulk"

    @property
    def lane_topics(self) -> list[str]:
        """The topics workers consume: the interactive lane (the request topic), then the bulk lane."""
        return [self.request_topic, self.bulk_topic_name]

    def to_env(self) -> dict[str, str]:
        """These settings as the variables that set them, to hand to a child process."""
        return {
            env_name(type(self), name): value.get_secret_value() if isinstance(value, SecretStr) else str(value)
            for name, value in self.model_dump().items()
            if value is not None
        }


def env_name(cls: type[BaseSettings], field: str) -> str:
    """The variable that sets `field` of `cls` (the first, where a field accepts several)."""
    return env_names(cls, field)[0]


def env_names(cls: type[BaseSettings], field: str) -> list[str]:
    """Every variable that sets `field` of `cls`: its own name, then any older one still accepted."""
    alias = cls.model_fields[field].validation_alias
    if isinstance(alias, AliasChoices):
        return [str(choice) for choice in alias.choices]
    if isinstance(alias, str):
        return [alias]
    return [f"{cls.model_config['env_prefix']}{field}".upper()]


def parse_settings(argv: Sequence[str] | None, prog: str, description: str,
                   *classes: type[BaseSettings]) -> tuple[Any, ...]:
    """One instance of each class, from the environment with the command line's flags on top.

    Every field marked `cli(...)` becomes a flag; its help names the variable and default.
    """
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for index, cls in enumerate(classes):
        for name, info in cls.model_fields.items():
            extra = info.json_schema_extra
            flag = extra.get("flag") if isinstance(extra, dict) else None
            if flag is None:
                continue
            kind = _unoptional(info.annotation)
            help_text = f"{env_name(cls, name)} (default {info.default})"
            dest = f"{index}.{name}"
            if kind is bool:
                parser.add_argument(flag, dest=dest, action="store_const", const=True, help=help_text)
            elif typing.get_origin(kind) is Literal:
                parser.add_argument(flag, dest=dest, choices=typing.get_args(kind), help=help_text)
            else:
                convert = kind if kind in (int, float, str, Path) else str
                parser.add_argument(flag, dest=dest, type=convert, metavar=convert.__name__.upper(), help=help_text)
    given = {dest: value for dest, value in vars(parser.parse_args(argv)).items() if value is not None}
    try:
        return tuple(cls(**{dest.split(".", 1)[1]: value for dest, value in given.items()
                            if dest.startswith(f"{index}.")})
                     for index, cls in enumerate(classes))
    except ValidationError as exc:
        parser.error("; ".join(map(_describe, exc.errors())))


def _describe(error: dict) -> str:
    where = ".".join(map(str, error["loc"]))
    message = error["msg"].removeprefix("Value error, ")
    return f"{where}: {message}" if where else message


def _unoptional(annotation: Any) -> Any:
    """`X` of `X | None`."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation
