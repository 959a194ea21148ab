"""The scaler's own settings (`LLMQ_SCALER_*`). The Kafka topic and consumer
group it watches come from `shared.settings.ServiceSettings` (`LLMQ_*`); the
workers it starts read their own settings from the environment they inherit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.settings import cli


class ScalerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LLMQ_SCALER_", extra="ignore", populate_by_name=True)

    # What it scales: request workers, or the trainers of fine-tuning jobs (run one scaler per pool).
    pool: Literal["workers", "trainers"] = Field(default="workers", json_schema_extra=cli("--pool"))
    # Where workers run: child processes of the scaler, or a Kubernetes Deployment.
    backend: Literal["local", "kubernetes"] = Field(default="local", json_schema_extra=cli("--backend"))
    # Fewest workers, also when idle (0 = scale to zero).
    min: int = Field(default=0, ge=0, json_schema_extra=cli("--min"))
    # Most workers; never more than the request topic's partitions either.
    max: int = Field(default=4, ge=1, json_schema_extra=cli("--max"))
    # Queue depth one worker is expected to carry (KEDA's lagThreshold; 10 there too).
    target_per_worker: int = Field(default=10, ge=1, json_schema_extra=cli("--target-per-worker"))
    # 0 -> 1 once depth exceeds this (KEDA's activationLagThreshold); depth at or
    # under it counts as idle for scaling to zero.
    activation_threshold: int = Field(default=0, ge=0, json_schema_extra=cli("--activation-threshold"))
    # How often the lag is read and a decision taken.
    poll_interval_seconds: float = Field(default=1.0, gt=0, json_schema_extra=cli("--poll-interval"))
    # Most workers the bulk lane's lag alone asks for (interactive lag scales to max); 1: a
    # batch gets done from zero on one worker; 0: bulk alone wakes no worker and keeps none.
    bulk_max_workers: int = Field(default=1, ge=0, json_schema_extra=cli("--bulk-max-workers"))
    # Scale down only after depth has needed fewer workers for this long.
    stabilization_seconds: float = Field(default=60.0, ge=0, json_schema_extra=cli("--stabilization"))
    # Scale the last worker away only after the queue has been idle this long.
    idle_seconds: float = Field(default=300.0, ge=0, json_schema_extra=cli("--idle"))
    # Print each decision and why, but start and stop nothing.
    dry_run: bool = Field(default=False, json_schema_extra=cli("--dry-run"))
    # Prometheus gauges on this port (0 = off).
    metrics_port: int = Field(default=0, ge=0, le=65535, json_schema_extra=cli("--metrics-port"))
    metrics_host: str = Field(default="127.0.0.1", json_schema_extra=cli("--metrics-host"))

    # --- local backend --------------------------------------------------------
    # How long a worker may drain after SIGTERM before it is killed (its
    # uncommitted requests are then redelivered to another worker).
    grace_seconds: float = Field(default=30.0, ge=0, json_schema_extra=cli("--grace"))
    # Where the pids of the workers it started are kept, to adopt them after a restart.
    state_dir: Path = Field(default=Path(".llmq/scaler"), json_schema_extra=cli("--state-dir"))
    # Each worker's stdout/stderr to worker-<n>.log here; unset: the scaler's own.
    worker_log_dir: Path | None = Field(default=None, json_schema_extra=cli("--worker-log-dir"))

    # The workers' own LLMQ_METRICS_PORT: each worker it starts gets the next free port from there.
    worker_metrics_port: int = Field(default=9400, ge=0, le=65535,
                                     validation_alias=AliasChoices("LLMQ_METRICS_PORT"))
    # LLMQ_ENGINE of the workers it starts; unset: the one they inherit.
    worker_engine: Literal["torch", "vllm", "echo"] | None = Field(default=None, json_schema_extra=cli("--engine"))

    # --- kubernetes backend ---------------------------------------------------
    deployment: str = Field(default="llmq-worker", json_schema_extra=cli("--deployment"))
    namespace: str = Field(default="default", json_schema_extra=cli("--namespace"))
    # kubeconfig file; unset: in-cluster credentials, else ~/.kube/config.
    kubeconfig: str | None = Field(default=None, json_schema_extra=cli("--kubeconfig"))
    # kubeconfig context; unset: the current one.
    kube_context: str | None = Field(default=None, json_schema_extra=cli("--kube-context"))

    @model_validator(mode="after")
    def _min_not_above_max(self) -> ScalerSettings:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) is above max ({self.max})")
        return self
