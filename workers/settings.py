"""A worker's settings (`LLMQ_*`), beside what every process reads."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field

from shared.settings import ServiceSettings, cli
from shared.training import split_fine_tuned


def default_model_name(model: str) -> str:
    """The name clients use for a model given by path or hub name, when none is set: its last part."""
    return Path(model.rstrip("/")).name or model


class WorkerSettings(ServiceSettings):
    # --- engine ---------------------------------------------------------------
    # Engine the worker runs: a PyTorch/transformers model, vLLM, or echo (no model).
    engine: Literal["torch", "vllm", "echo"] = Field(default="torch", json_schema_extra=cli("--engine"))
    # Local path or hub name of the model the worker serves, or the served name of a full
    # fine-tune ("tiny-llama:ft-x-0a1b2c3d"), loaded from LLMQ_REGISTRY_DIR/models.
    model: str = Field(default=".llmq/models/tiny-llama", json_schema_extra=cli("--model"))
    # Name clients use in `model`; defaults to the last part of `model`.
    model_name: str | None = None
    # torch engine: "auto" picks cuda when available, else cpu.
    device: str = "auto"
    # "auto" is bfloat16 on cuda, float32 on cpu (torch engine; an optimized model: its own dtype, llmq-model.json);
    # on vLLM float32 on cpu, vLLM's own choice on cuda.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # Continuous batching: most requests decoded together (the engine's running batch) ...
    batch_max_size: int = Field(default=32, ge=1, json_schema_extra=cli("--batch-max-size"))
    # ... and most tokens they may hold together (prompt + max_tokens each), which
    # bounds the KV cache's memory. A request alone in the batch always runs.
    # On vLLM's CPU backend: the size of vLLM's KV cache, in tokens (see below).
    batch_max_tokens: int = Field(default=65_536, ge=1)
    # torch engine: "int8" applies PyTorch dynamic INT8 quantization to the linear
    # layers (CPU, float32 models); "none" runs the weights as loaded.
    quantize: Literal["none", "int8"] = "none"
    # Adapters (peft `save_pretrained` folders, one per adapter name: LoRA, or (IA)^3 on the
    # torch engine) a request may name in `adapter`; unset: none served. Fine-tuning publishes
    # its LoRA and (IA)^3 outputs in LLMQ_REGISTRY_DIR/adapters.
    adapters_dir: str | None = None
    # Most adapters loaded at once (least recently used unloaded when a new one is needed).
    max_adapters: int = Field(default=4, ge=1)
    # vllm engine: the share of memory vLLM reserves for weights and KV cache (of the GPU's
    # on CUDA; of this NUMA node's on its CPU backend). Unset: vLLM's own 0.92 on CUDA; on
    # CPU a KV cache of batch_max_tokens tokens, which spares vLLM the warm-up run it sizes
    # the cache by (17 s of a worker's start here, for 3 GiB of the 30 % it was given).
    vllm_memory_utilization: float | None = Field(default=None, gt=0, le=1)
    # vllm engine: run eagerly, without torch.compile or CUDA graphs. Unset: eager on CPU, where
    # compiling took a worker's start from about 35 s to about 100 s; compiled on CUDA.
    vllm_enforce_eager: bool | None = None
    # echo engine: simulated time per output token (benchmarks, scaler tests).
    echo_token_delay_ms: float = Field(default=0.0, ge=0)

    # Most one write of running requests' new text (GET's text so far, SSE streams) per this
    # many ms; a request's first text is never held. 0: a write per step (one in flight at a time).
    stream_interval_ms: float = Field(default=0.0, ge=0)

    # --- consuming ------------------------------------------------------------
    # Most requests a worker holds (running + waiting for a slot); it pauses its
    # Kafka fetch at this many. 0: twice batch_max_size.
    max_in_flight: int = Field(default=0, ge=0)
    # Most of the in-flight places (above) bulk-lane requests may hold, so that an interactive
    # request arriving in the middle of a batch is fetched, and starts, at once: at the default
    # max_in_flight (twice the batch) bulk fills at most three quarters of the engine's batch.
    bulk_max_share: float = Field(default=0.375, gt=0, le=1)
    # Bulk requests a worker keeps in flight while the bulk lane has waiting work, however
    # busy the interactive lane is (the starvation guard); 0: bulk only while interactive is idle.
    bulk_min_in_flight: int = Field(default=1, ge=0)
    # Fetched requests whose claim at most this many times already started (the worker
    # died each time: a poison message) go to the dead-letter topic instead of running.
    max_attempts: int = Field(default=3, ge=1)
    # Most messages taken from Kafka per fetch.
    fetch_max_records: int = Field(default=256, ge=1)
    # How long a fetch waits on the broker for new records. Kafka answers as soon as
    # records arrive; the dev broker waits this out, so it bounds queue latency there.
    fetch_max_wait_ms: int = Field(default=10, ge=1)
    # Kafka group session timeout: how soon a dead worker's partitions move on.
    session_timeout_ms: int = Field(default=10_000, ge=1000)
    # A running claim's lease: the worker running a request renews it every third of this;
    # another worker handed the same message (after a rebalance, or a duplicate) runs it
    # only once the lease has lapsed, so a request whose worker is alive never runs twice.
    claim_lease_seconds: float = Field(default=15.0, gt=0)
    # After SIGTERM, how long a worker finishes what it holds before it hands the
    # rest back uncommitted (keep it under the scaler's LLMQ_SCALER_GRACE_SECONDS).
    drain_seconds: float = Field(default=25.0, ge=0)

    # --- logs and metrics -----------------------------------------------------
    # Log each request's prompt when a worker starts it (off: prompts are private).
    log_prompts: bool = False
    # Port of the worker's Prometheus /metrics (0: none).
    metrics_port: int = Field(default=9400, ge=0, le=65535)
    # Address /metrics listens on; where unset, LLMQ_HTTP_HOST (what deployments set for every process) is read.
    metrics_host: str = Field(default="127.0.0.1",
                              validation_alias=AliasChoices("LLMQ_METRICS_HOST", "LLMQ_HTTP_HOST"))

    @property
    def fine_tuned_output(self) -> str | None:
        """The registry's name of the full fine-tune LLMQ_MODEL names, or None (a path
        or hub name; an existing folder whose name looks like a served name is a path)."""
        split = split_fine_tuned(self.model)
        if split is None or self.engine == "echo" or Path(self.model).is_dir():
            return None
        return split[1]

    @property
    def model_path(self) -> str:
        """What the engine loads: LLMQ_MODEL, or a full fine-tune's folder in the registry."""
        output = self.fine_tuned_output
        return str(Path(self.registry_dir) / "models" / output) if output else self.model

    @property
    def served_model_name(self) -> str:
        if self.model_name:
            return self.model_name
        if self.engine == "echo":
            return "echo"
        if self.fine_tuned_output:
            return self.model  # the name the fine-tuning job published it under
        return default_model_name(self.model)
