"""The contracts of optimization jobs (`/v1/optimization/jobs`), shared by the gateway
that takes them and the trainers that run them: the strategies and their settings
(validated at submit), the body a client sends, the versioned Kafka message a job
travels as (on the fine-tuning topic, to the same trainers), and how an optimized
model is named.

An optimization job turns a source model (the base model, a full fine-tune, a LoRA
fine-tune for `merge_lora`, or an earlier optimized model, so strategies chain)
into a whole model published in the registry's `models/` folder, served by a worker
started with `LLMQ_MODEL=<its name>`, exactly as a full fine-tune is.

Strategies:
- `int8_dynamic`: PyTorch dynamic INT8 of the linear layers (weights int8, activations
  quantized per batch), stored quantized.
- `weight_only`: torchao weight-only INT8 (per channel) or INT4 (per group) linears.
- `qat`: quantization-aware training: a short fine-tune with torchao's fake-quantized
  linears, then converted to the same weight-only format.
- `prune_l1`: L1 unstructured pruning (the smallest weights zeroed); stored dense.
- `prune_structured`: whole attention heads (KV groups), MLP channels and/or decoder
  layers removed, so the matrices really shrink.
- `precision`: the weights cast to float32, bfloat16 or float16.
- `merge_lora`: a LoRA fine-tune's adapter merged into its base's weights.
Pruning takes an optional `recovery`: a short full fine-tune on the job's training file.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    model_validator,
)

from shared import training
from shared.schema import MAX_METADATA_ITEMS
from shared.training import FINE_TUNED_MARK, OPTIMIZED_MARK, Auto, Suffix, json_numbers

JOB_ID = re.compile(r"^optjob-[0-9a-f]{24}$")
# The marks a derived model's served name carries after its source's name; the part
# after the last one is its folder's name in the registry (shared.training.split_fine_tuned).
DERIVED_MARKS = (FINE_TUNED_MARK, OPTIMIZED_MARK)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Recovery(_Strict):
    """A short full fine-tune after pruning (or the QAT run itself), on the job's training file."""

    n_epochs: Annotated[int, Field(ge=1, le=20)] = 1
    batch_size: Annotated[int, Field(ge=1, le=256)] | Auto = "auto"
    # × the trainer's full fine-tune learning rate.
    learning_rate_multiplier: Annotated[float, Field(gt=0, le=100)] = 1.0

    @model_validator(mode="before")
    @classmethod
    def _numbers_from_json(cls, data):
        return json_numbers(data, ("n_epochs", "batch_size"), ("learning_rate_multiplier",))


class Int8Dynamic(_Strict):
    type: Literal["int8_dynamic"]


class WeightOnly(_Strict):
    type: Literal["weight_only"]
    bits: Literal[4, 8] = 8
    # INT4 only: weights share a scale per this many input channels.
    group_size: Literal[16, 32, 64, 128, 256] = 32


class Qat(_Strict):
    type: Literal["qat"]
    bits: Literal[4, 8] = 4
    group_size: Literal[16, 32, 64, 128, 256] = 32
    training: Recovery = Recovery()


class PruneL1(_Strict):
    type: Literal["prune_l1"]
    # Share of each linear layer's weights zeroed (the smallest by magnitude).
    sparsity: Annotated[float, Field(gt=0, lt=1)] = 0.5
    recovery: Recovery | None = None


class PruneStructured(_Strict):
    type: Literal["prune_structured"]
    # Shares kept, each rounded to whole units: attention heads (whole KV groups, so
    # grouped-query attention stays grouped), MLP channels, decoder layers.
    heads_kept: Annotated[float, Field(gt=0, le=1)] = 1.0
    mlp_kept: Annotated[float, Field(gt=0, le=1)] = 0.5
    layers_kept: Annotated[float, Field(gt=0, le=1)] = 1.0
    recovery: Recovery | None = None

    @model_validator(mode="after")
    def _removes_something(self):
        if self.heads_kept == self.mlp_kept == self.layers_kept == 1.0:
            raise ValueError("heads_kept, mlp_kept and layers_kept are all 1: nothing would be pruned")
        return self


class Precision(_Strict):
    type: Literal["precision"]
    dtype: Literal["float32", "bfloat16", "float16"]


class MergeLora(_Strict):
    type: Literal["merge_lora"]


Strategy = Annotated[Int8Dynamic | WeightOnly | Qat | PruneL1 | PruneStructured | Precision | MergeLora,
                     Field(discriminator="type")]
StrategyType = Literal["int8_dynamic", "weight_only", "qat", "prune_l1", "prune_structured", "precision",
                       "merge_lora"]
STRATEGY = TypeAdapter(Strategy)


def needs_training_file(strategy) -> bool:
    """Whether a strategy trains: QAT always, pruning when a recovery is asked for."""
    return strategy.type == "qat" or getattr(strategy, "recovery", None) is not None


# A source's name leaves room for what its output's name adds (":opt-", a suffix of at most
# 40, "-" and 8 hex), so the output is still a name a request's `model` (256) can carry.
MAX_SOURCE_NAME = 256 - len(OPTIMIZED_MARK) - 40 - 9


class OptimizationJobCreate(_Strict):
    """The body of POST /v1/optimization/jobs."""

    # The source: a base model, a fine-tuned or optimized model of the caller's key
    # (for merge_lora: a LoRA fine-tune).
    model: Annotated[str, StringConstraints(min_length=1, max_length=MAX_SOURCE_NAME)]
    strategy: Strategy
    # What QAT and a recovery fine-tune train on (required for them), as fine-tuning's files.
    training_file: str | None = None
    # Evaluated before and after (eval loss, perplexity, accuracy of short answers); without
    # it, a share of training_file is held out, and without either nothing is evaluated.
    validation_file: str | None = None
    suffix: Suffix | None = None
    seed: Annotated[int, Field(ge=0, le=2**31 - 1)] | None = None
    metadata: dict[Annotated[str, StringConstraints(max_length=64)],
                   Annotated[str, StringConstraints(max_length=512)]] | None = Field(
        default=None, max_length=MAX_METADATA_ITEMS)

    @model_validator(mode="before")
    @classmethod
    def _seed_from_json(cls, data):
        return json_numbers(data, ("seed",), ())

    @model_validator(mode="after")
    def _files_for_training(self):
        if needs_training_file(self.strategy) and self.training_file is None:
            raise ValueError(f"training_file is required: strategy {self.strategy.type!r} trains on it")
        return self


class OptimizationMessage(_Strict):
    """An optimization job on the fine-tuning topic (key: its id), read by trainers beside
    fine-tuning jobs (`kind` tells them apart). Self-contained, as TrainingMessage."""

    v: Literal[1] = 1
    kind: Literal["optimization"] = "optimization"
    id: str
    tenant: str | None = None
    model: str  # the source model's served name
    base_model: str  # the base model it derives from: what a trainer must have
    strategy: Strategy
    training_file: str | None = None
    validation_file: str | None = None
    seed: int
    optimized_model: str  # the name its output is published under


class MessageError(training.MessageError):
    """An optimization message that doesn't parse or fit the schema."""


def parse_message(value: bytes | None) -> OptimizationMessage:
    try:
        return OptimizationMessage.model_validate_json(value or b"")
    except ValidationError as exc:
        raise MessageError(str(exc).splitlines()[0]) from exc


def parse_job_message(value: bytes | None):
    """A message of the fine-tuning topic: an OptimizationMessage when its `kind` says so,
    else a fine-tuning job's TrainingMessage (which has no `kind`), parsed exactly as before.
    shared.training.MessageError or this module's MessageError when it is neither."""
    try:
        kind = json.loads(value or b"").get("kind")
    except (ValueError, AttributeError):
        kind = None  # not a JSON object: the fine-tuning parser says what is wrong with it
    if kind == "optimization":
        return parse_message(value)
    return training.parse_message(value)


# ---- names -----------------------------------------------------------------------


def strategy_tag(strategy) -> str:
    """A short name of a strategy and its main setting, for output names: int8, wo4, qat4,
    l1-50, pruned, bf16, merged."""
    match strategy.type:
        case "int8_dynamic":
            return "int8"
        case "weight_only":
            return f"wo{strategy.bits}"
        case "qat":
            return f"qat{strategy.bits}"
        case "prune_l1":
            return f"l1-{round(strategy.sparsity * 100)}"
        case "prune_structured":
            return "pruned"
        case "precision":
            return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[strategy.dtype]
        case _:
            return "merged"


def optimized_name(source: str, suffix: str | None, strategy, job_id: str) -> str:
    """`{source}:opt-{suffix or strategy tag}-{8 hex of the job id}`."""
    return f"{source}{OPTIMIZED_MARK}{suffix or strategy_tag(strategy)}-{job_id[-8:]}"


def root_model(name: str) -> str:
    """The base model a served name derives from, through any chain of fine-tunes and optimizations."""
    cuts = [i for mark in DERIVED_MARKS if (i := name.find(mark)) > 0]
    return name[:min(cuts)] if cuts else name
