"""Every scaler setting, declared once, typed, with its default (`LLMQ_SCALER_*`).

The Kafka topic, consumer group and the workers' own settings come from
`shared.settings.Settings` (`LLMQ_*`); these are only the scaler's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class ScalerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LLMQ_SCALER_", extra="ignore")

    # Where workers run: child processes of the scaler, or a Kubernetes Deployment.
    backend: Literal["local", "kubernetes"] = "local"
    # Fewest workers, also when idle (0 = scale to zero).
    min: int = Field(default=0, ge=0)
    # Most workers; never more than the request topic's partitions either.
    max: int = Field(default=4, ge=1)
    # Queue depth one worker is expected to carry (KEDA's lagThreshold; 10 there too).
    target_per_worker: int = Field(default=10, ge=1)
    # 0 -> 1 once depth exceeds this (KEDA's activationLagThreshold); depth at or
    # under it counts as idle for scaling to zero.
    activation_threshold: int = Field(default=0, ge=0)
    # How often the lag is read and a decision taken.
    poll_interval_seconds: float = Field(default=1.0, gt=0)
    # Scale down only after depth has needed fewer workers for this long.
    stabilization_seconds: float = Field(default=60.0, ge=0)
    # Scale the last worker away only after the queue has been idle this long.
    idle_seconds: float = Field(default=300.0, ge=0)
    # Print each decision and why, but start and stop nothing.
    dry_run: bool = False
    # Prometheus gauges on this port (0 = off).
    metrics_port: int = Field(default=0, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"

    # --- local backend --------------------------------------------------------
    # How long a worker may drain after SIGTERM before it is killed (its
    # uncommitted requests are then redelivered to another worker).
    grace_seconds: float = Field(default=30.0, ge=0)
    # Where the pids of the workers it started are kept, to adopt them after a restart.
    state_dir: Path = Path(".llmq/scaler")
    # Each worker's stdout/stderr to worker-<n>.log here; unset: the scaler's own.
    worker_log_dir: Path | None = None

    # --- kubernetes backend ---------------------------------------------------
    deployment: str = "llmq-worker"
    namespace: str = "default"
    # kubeconfig file; unset: in-cluster credentials, else ~/.kube/config.
    kubeconfig: str | None = None
    # kubeconfig context; unset: the current one.
    kube_context: str | None = None

    @model_validator(mode="after")
    def _min_not_above_max(self) -> ScalerSettings:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) is above max ({self.max})")
        return self
