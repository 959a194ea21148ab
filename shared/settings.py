"""Every llmq setting, declared once, typed, with its default.

Read from `LLMQ_*` environment variables (pydantic-settings); command-line
flags of each process override them by passing keyword arguments.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LLMQ_", extra="ignore")

    # --- services -----------------------------------------------------------
    # Kafka bootstrap servers, comma-separated host:port.
    kafka_bootstrap: str = "127.0.0.1:9092"
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
    # Redis URL for request records and completion notifications.
    redis_url: str = "redis://127.0.0.1:6379/0"
    # Topic the gateway produces to and workers consume from.
    request_topic: str = "llmq.requests"
    # Where unparseable or schema-invalid request messages go, with the reason.
    dlq_topic: str = "llmq.requests.dlq"
    # Partitions of the request topic when llmq creates it (caps useful workers).
    request_partitions: int = Field(default=8, ge=1)
    # Kafka consumer group shared by all workers.
    consumer_group: str = "llmq-workers"
    # Prefix of every Redis key llmq writes (see shared/keys.py).
    redis_prefix: str = "llmq"

    # --- gateway ------------------------------------------------------------
    http_host: str = "127.0.0.1"
    http_port: int = Field(default=8000, ge=0, le=65535)
    # Largest accepted HTTP request body, bytes (413 above it).
    max_body_bytes: int = Field(default=1_048_576, ge=1024)
    # Longest accepted prompt (or sum of chat message contents), characters (413 above it).
    max_prompt_chars: int = Field(default=32_768, ge=1)
    # Largest accepted params.max_tokens (422 above it).
    max_tokens_limit: int = Field(default=4096, ge=1)
    # Cap on GET ?wait= seconds.
    max_wait_seconds: float = Field(default=60.0, ge=0)
    # How long the gateway waits for the broker to acknowledge a produce before answering 503.
    produce_timeout_seconds: float = Field(default=5.0, gt=0)
    # Producer batching delay. 0: a request is answered only after its ack, so any
    # linger is added latency; under load records batch anyway while a send is in flight.
    producer_linger_ms: int = Field(default=0, ge=0)

    # Require `Authorization: Bearer <key>` on /v1 (keys: `llmq keys create NAME`). `llmq up` turns it off.
    auth: bool = True
    # Requests per second each API key may submit (token bucket in Redis; 0: no limit; needs auth).
    rate_limit_rps: float = Field(default=50.0, ge=0)
    # How many submits a key may make at once above its rate.
    rate_limit_burst: int = Field(default=100, ge=1)

    # Queue admission: refuse submits (429 queue_full) while the workers' lag is at or
    # above this many requests (0: no bound). The gateway reads the lag once a second.
    max_queue_depth: int = Field(default=0, ge=0)

    # --- records ------------------------------------------------------------
    # How long a request record (and its result) stays readable in Redis.
    result_ttl_seconds: int = Field(default=86_400, ge=1)

    # --- worker -------------------------------------------------------------
    # Engine the worker runs: a PyTorch/transformers model, vLLM, or echo (no model).
    engine: Literal["torch", "vllm", "echo"] = "torch"
    # Local path or hub name of the model the worker serves.
    model: str = ".llmq/models/tiny-llama"
    # Name clients use in `model`; defaults to the last part of `model`.
    model_name: str | None = None
    # torch engine: "auto" picks cuda when available, else cpu.
    device: str = "auto"
    # torch engine dtype: "auto" is bfloat16 on cuda, float32 on cpu.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # Continuous batching: most requests decoded together (the engine's running batch) ...
    batch_max_size: int = Field(default=32, ge=1)
    # ... and most tokens they may hold together (prompt + max_tokens each), which
    # bounds the KV cache's memory. A request alone in the batch always runs.
    batch_max_tokens: int = Field(default=65_536, ge=1)
    # Most requests a worker holds (running + waiting for a slot); it pauses its
    # Kafka fetch at this many. 0: twice batch_max_size.
    max_in_flight: int = Field(default=0, ge=0)
    # Fetched requests whose claim at most this many times already started (the worker
    # died each time: a poison message) go to the dead-letter topic instead of running.
    max_attempts: int = Field(default=3, ge=1)
    # torch engine: "int8" applies PyTorch dynamic INT8 quantization to the linear
    # layers (CPU, float32 models); "none" runs the weights as loaded.
    quantize: Literal["none", "int8"] = "none"
    # LoRA adapters (peft `save_pretrained` folders, one per adapter name) a request
    # may name in `adapter`; unset: none served.
    adapters_dir: str | None = None
    # Most adapters loaded at once (least recently used unloaded when a new one is needed).
    max_adapters: int = Field(default=4, ge=1)
    # Most messages taken from Kafka per fetch.
    fetch_max_records: int = Field(default=256, ge=1)
    # How long a fetch waits on the broker for new records. Kafka answers as soon as
    # records arrive; the dev broker waits this out, so it bounds queue latency there.
    fetch_max_wait_ms: int = Field(default=10, ge=1)
    # After SIGTERM, how long a worker finishes what it holds before it hands the
    # rest back uncommitted (keep it under the scaler's LLMQ_SCALER_GRACE_SECONDS).
    drain_seconds: float = Field(default=25.0, ge=0)
    # Kafka group session timeout: how soon a dead worker's partitions move on.
    session_timeout_ms: int = Field(default=10_000, ge=1000)
    # echo engine: simulated time per output token (benchmarks, scaler tests).
    echo_token_delay_ms: float = Field(default=0.0, ge=0)

    # --- logs ---------------------------------------------------------------
    log_level: str = "info"
    # "auto" writes readable lines on a terminal and JSON lines otherwise.
    log_format: Literal["auto", "json", "console"] = "auto"
    # Log each request's prompt when a worker starts it (off: prompts are private).
    log_prompts: bool = False

    # --- metrics --------------------------------------------------------------
    # Port of the worker's Prometheus /metrics (0: none). The gateway serves its own on LLMQ_HTTP_PORT.
    metrics_port: int = Field(default=9400, ge=0, le=65535)

    @property
    def served_model_name(self) -> str:
        if self.model_name:
            return self.model_name
        if self.engine == "echo":
            return "echo"
        return Path(self.model.rstrip("/")).name or self.model

    def to_env(self) -> dict[str, str]:
        """These settings as LLMQ_* variables, to hand to a child process."""
        return {
            f"LLMQ_{name.upper()}": value.get_secret_value() if isinstance(value, SecretStr) else str(value)
            for name, value in self.model_dump().items()
            if value is not None
        }


def settings_from_cli(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> Settings:
    """Settings from LLMQ_* variables, with the flags given on the command line on top.

    Each flag's `dest` is the Settings field it overrides.
    """
    args = parser.parse_args(argv)
    return Settings(**{name: value for name, value in vars(args).items() if value is not None})
