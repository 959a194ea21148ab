"""The contracts of fine-tuning jobs (OpenAI's `/v1/fine_tuning/jobs`), shared by
the gateway that takes them and the trainers that run them: the body a client
sends, the methods and their hyperparameters (validated at submit), a training
file's lines, the versioned Kafka message a job travels as, and how a job's
output is named and found in the registry.

Methods:
- `lora` (the default; OpenAI's `supervised` means it too): peft LoRA adapters,
  served by name in the same running batch as base requests.
- `adapter`: peft's (IA)^3, small trained vectors that rescale the attention's
  keys and values and the MLP's inner activations, inserted in every layer and
  served by name like a LoRA adapter. (The `adapters` package's bottleneck
  adapters would be the other choice; it pins transformers 4.x.)
- `full`: every weight trained; the output is a whole model, served by a
  worker started on it (`LLMQ_MODEL=<its name>`).
"""

from __future__ import annotations

import json
import re
from enum import Enum
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

from shared.schema import MAX_METADATA_ITEMS, ChatMessage

JOB_ID = re.compile(r"^ftjob-[0-9a-f]{24}$")
MESSAGE_VERSION = 1
# What the served name of an output carries after the base model's name:
# "tiny-llama:ft-finsent-0a1b2c3d". The part after the colon is also its adapter's
# name (workers' adapter-name rule: no colon, no slash).
FINE_TUNED_MARK = ":ft-"
# An optimization job's output (shared/optimization.py): "tiny-llama:ft-x-0a1b2c3d:opt-int8-9f8e7d6c".
OPTIMIZED_MARK = ":opt-"
Suffix = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9-]{0,39}$")]


class JobStatus(str, Enum):
    validating_files = "validating_files"
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def final(self) -> bool:
        return self in (JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled)


def json_numbers(data, ints: tuple[str, ...], floats: tuple[str, ...]):
    """JSON has one number type, strict pydantic two: `ints` given as integral floats (3.0
    epochs) become ints, `floats` given as ints (a multiplier of 2) become floats."""
    if not isinstance(data, dict):
        return data
    data = dict(data)
    for name in ints:
        if isinstance(data.get(name), float) and data[name].is_integer():
            data[name] = int(data[name])
    for name in floats:
        if isinstance(data.get(name), int) and not isinstance(data[name], bool):
            data[name] = float(data[name])
    return data


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


Auto = Literal["auto"]


class Hyperparameters(_Strict):
    """OpenAI's three, each a number or "auto" (the trainer picks from the data), and
    gradient accumulation: the effective batch is batch_size × this."""

    n_epochs: Annotated[int, Field(ge=1, le=50)] | Auto = "auto"
    batch_size: Annotated[int, Field(ge=1, le=256)] | Auto = "auto"
    # × the method's base learning rate (trainer settings). 0 is allowed: the job then
    # learns nothing and the quality gate refuses it.
    learning_rate_multiplier: Annotated[float, Field(ge=0, le=100)] | Auto = "auto"
    gradient_accumulation_steps: Annotated[int, Field(ge=1, le=256)] = 1

    @model_validator(mode="before")
    @classmethod
    def _numbers_from_json(cls, data):
        return json_numbers(data, ("n_epochs", "batch_size", "gradient_accumulation_steps"),
                            ("learning_rate_multiplier",))


ModuleNames = Annotated[list[Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.]{1,64}$")]],
                        Field(min_length=1, max_length=32)]


class LoraHyperparameters(Hyperparameters):
    rank: Annotated[int, Field(ge=1, le=256)] = 8
    alpha: Annotated[float, Field(gt=0, le=1024)] = 16.0
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    # Module names (peft's target_modules) or "all-linear": every linear layer but the output head.
    target_modules: ModuleNames | Literal["all-linear"] = "all-linear"

    @model_validator(mode="before")
    @classmethod
    def _alpha_from_json(cls, data):
        return json_numbers(data, (), ("alpha",))


class AdapterHyperparameters(Hyperparameters):
    # peft (IA)^3: which modules get a trained scaling vector, and which of those are
    # feed-forward (scaled on their input rather than their output). Llama's names by default.
    target_modules: ModuleNames = ["k_proj", "v_proj", "down_proj"]
    feedforward_modules: list[str] = ["down_proj"]

    @model_validator(mode="after")
    def _feedforward_is_targeted(self):
        stray = sorted(set(self.feedforward_modules) - set(self.target_modules))
        if stray:
            raise ValueError(f"feedforward_modules {stray} are not in target_modules")
        return self


class FullHyperparameters(Hyperparameters):
    pass


class _MethodSettings(_Strict):
    hyperparameters: Hyperparameters = Hyperparameters()


class LoraSettings(_MethodSettings):
    hyperparameters: LoraHyperparameters = LoraHyperparameters()


class AdapterSettings(_MethodSettings):
    hyperparameters: AdapterHyperparameters = AdapterHyperparameters()


class FullSettings(_MethodSettings):
    hyperparameters: FullHyperparameters = FullHyperparameters()


MethodType = Literal["lora", "adapter", "full"]


class Method(_Strict):
    """`{"type": "lora", "lora": {"hyperparameters": {...}}}`; OpenAI's
    `{"type": "supervised", "supervised": {...}}` is read as LoRA."""

    type: MethodType = "lora"
    lora: LoraSettings | None = None
    adapter: AdapterSettings | None = None
    full: FullSettings | None = None

    @model_validator(mode="before")
    @classmethod
    def _supervised_is_lora(cls, data):
        if isinstance(data, dict) and data.get("type") == "supervised":
            given = data.get("supervised")
            data = {k: v for k, v in data.items() if k != "supervised"} | {"type": "lora"}
            if given is not None:
                data["lora"] = given
        return data

    @model_validator(mode="after")
    def _only_its_own_settings(self):
        for other in ("lora", "adapter", "full"):
            if other != self.type and getattr(self, other) is not None:
                raise ValueError(f"settings for {other!r} given with method type {self.type!r}")
        if getattr(self, self.type) is None:
            setattr(self, self.type, {"lora": LoraSettings, "adapter": AdapterSettings, "full": FullSettings}[
                self.type]())
        return self

    @property
    def settings(self) -> LoraSettings | AdapterSettings | FullSettings:
        return getattr(self, self.type)

    @property
    def hyperparameters(self) -> Hyperparameters:
        return self.settings.hyperparameters


class JobCreate(_Strict):
    """The body of POST /v1/fine_tuning/jobs."""

    model: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    training_file: str
    validation_file: str | None = None
    method: Method | None = None
    # OpenAI's older top-level form; used when `method` is absent (refused beside it).
    hyperparameters: Hyperparameters | None = None
    suffix: Suffix | None = None
    seed: Annotated[int, Field(ge=0, le=2**31 - 1)] | None = None
    metadata: dict[Annotated[str, StringConstraints(max_length=64)],
                   Annotated[str, StringConstraints(max_length=512)]] | None = Field(
        default=None, max_length=MAX_METADATA_ITEMS)
    # OpenAI's Weights & Biases integration: refused when given (not offered), never ignored.
    integrations: list | None = None

    @model_validator(mode="before")
    @classmethod
    def _seed_from_json(cls, data):
        # 841667.0 is an integer to JSON Schema and JSON clients (fuzzers send such), not to strict pydantic.
        return json_numbers(data, ("seed",), ())

    @model_validator(mode="after")
    def _one_form(self):
        if self.integrations:
            raise ValueError("integrations are not supported")
        if self.method is not None and self.hyperparameters is not None:
            raise ValueError("give hyperparameters inside `method`, not beside it")
        if self.method is None:
            given = self.hyperparameters.model_dump() if self.hyperparameters else {}
            self.method = Method.model_validate({"type": "lora", "lora": {"hyperparameters": given}})
        return self


class TrainingMessage(_Strict):
    """A job on the fine-tuning topic (key: its id). Self-contained, so a trainer
    needs nothing else to run it; its state lives in Redis (shared/store/fine_tuning.py)."""

    v: Literal[1] = MESSAGE_VERSION
    id: str
    tenant: str | None = None
    model: str
    training_file: str
    validation_file: str | None = None
    method: Method
    seed: int
    fine_tuned_model: str  # the name its output is published under


class MessageError(ValueError):
    """A training message that doesn't parse or fit the schema."""


def parse_message(value: bytes | None) -> TrainingMessage:
    try:
        return TrainingMessage.model_validate_json(value or b"")
    except ValidationError as exc:
        raise MessageError(str(exc).splitlines()[0]) from exc


# ---- a training file's lines --------------------------------------------------


class Example(BaseModel):
    """One training line: what the model is given (a prompt, or the chat up to the last
    assistant turn) and what it should answer (the loss is on these tokens only)."""

    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    completion: str


class ExampleError(ValueError):
    pass


def parse_example(line: str | bytes) -> Example:
    """A line of a fine-tuning file: `{"messages": [..., {"role": "assistant", ...}]}`
    (the last message is the answer) or `{"prompt": ..., "completion": ...}`.
    ExampleError says what is wrong, in the words a user fixes their file by."""
    try:
        data = json.loads(line)
    except ValueError as exc:
        raise ExampleError(f"not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ExampleError("not a JSON object")
    if "messages" in data:
        messages = data["messages"]
        if not isinstance(messages, list) or len(messages) < 2:
            raise ExampleError("`messages` must be a list of at least two messages")
        try:
            chat = [ChatMessage.model_validate(m) for m in messages]
        except ValidationError as exc:
            raise ExampleError(f"a message is not {{'role', 'content'}}: {str(exc).splitlines()[0]}") from exc
        if chat[-1].role != "assistant":
            raise ExampleError("the last message must be the assistant's (the answer trained on)")
        if not chat[-1].content.strip():
            raise ExampleError("the assistant's answer is empty")
        return Example(messages=chat[:-1], completion=chat[-1].content)
    prompt, completion = data.get("prompt"), data.get("completion")
    if not isinstance(prompt, str) or not isinstance(completion, str):
        raise ExampleError("a line needs `messages`, or string `prompt` and `completion`")
    if not completion.strip():
        raise ExampleError("`completion` is empty")
    return Example(prompt=prompt, completion=completion)


# ---- names of outputs ----------------------------------------------------------


def fine_tuned_name(base: str, suffix: str | None, job_id: str) -> str:
    """`{base}:ft-{suffix}-{8 hex of the job id}`; the part after the colon is unique per job."""
    tag = f"{suffix}-" if suffix else ""
    return f"{base}{FINE_TUNED_MARK}{tag}{job_id[-8:]}"


def split_fine_tuned(name: str) -> tuple[str, str] | None:
    """(source model, output name) of a fine-tuned or optimized model's served name, or
    None: not one. The source may itself be derived ("base:ft-x-1:opt-int8-2" ->
    ("base:ft-x-1", "opt-int8-2")); the output is its folder's name in the registry."""
    cut = max(name.rfind(FINE_TUNED_MARK), name.rfind(OPTIMIZED_MARK))
    output = name[cut + 1:]
    if cut <= 0 or output in (FINE_TUNED_MARK[1:], OPTIMIZED_MARK[1:]):
        return None
    return name[:cut], output


# ---- the registry: published outputs on disk ------------------------------------
#
# {registry}/adapters/{output name}/  a peft folder (LoRA or (IA)^3), served by workers
#                                     whose LLMQ_ADAPTERS_DIR is {registry}/adapters
# {registry}/models/{output name}/    a whole model (full fine-tunes), served by a worker
#                                     started with LLMQ_MODEL set to it
# each with `llmq-model.json` beside the weights: the job, base model, method and eval figures.

REGISTRY_METADATA = "llmq-model.json"


def registry_path(registry: Path, method: MethodType, output_name: str) -> Path:
    return registry / ("models" if method == "full" else "adapters") / output_name
