"""Applying one strategy (shared/optimization.py) to a loaded model: what a job's run
and the strategies bench both call, so a bench row is exactly what a job publishes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from shared.optimization import Recovery
from workers.training.data import Tokenized


@dataclass
class Data:
    """What a strategy may train or calibrate on: the job's tokenized examples."""

    train: list[Tokenized]
    heldout: list[Tokenized]


@dataclass
class Optimized:
    model: Any  # a transformers model (peft merged and unloaded), ready to save
    # How workers load it (artifact.py): {"format": "hf" | "int8_dynamic" | "torchao", "dtype": "float32", ...}
    serving: dict
    # What the strategy did, measured on the result: parameters, sparsity, shapes, notes.
    figures: dict = field(default_factory=dict)


# (model, training settings) -> trains the model in place on the job's training examples
# (tune.fine_tune, bound to the job's tokenizer, data, learning rate, seed and hooks).
# A run stopped before the end (cancel, lost lease) raises out of it: the caller's concern.
Tune = Callable[[Any, Recovery], None]


def dtype_name(model: Any) -> str:
    """The name ("float32", ...) of the model's floating-point weights' dtype."""
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    return str(dtype).removeprefix("torch.")


def parameter_count(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


class StrategyError(ValueError):
    """A strategy that can't run on this model or machine; `code` is the job's error code
    (e.g. "not_available_here" for a kernel this hardware lacks)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def apply(strategy, model: Any, tokenizer: Any, *, data: Data | None, tune: Tune | None) -> Optimized:
    """The strategy applied to `model` (which it may change in place). `data` and `tune` are
    given when the job has a training file (strategies that train need them); for
    merge_lora, `model` is the peft model of the LoRA fine-tune."""
    from workers.optimize import pruning, quantization, weights

    match strategy.type:
        case "int8_dynamic":
            return quantization.int8_dynamic(model)
        case "weight_only":
            return quantization.weight_only(model, strategy)
        case "qat":
            return quantization.qat(model, strategy, tune)
        case "prune_l1":
            return pruning.prune_l1(model, strategy, tune)
        case "prune_structured":
            return pruning.prune_structured(model, strategy, data, tune, tokenizer=tokenizer)
        case "precision":
            return weights.precision(model, strategy)
        case "merge_lora":
            return weights.merge_lora(model)
    raise StrategyError("invalid_strategy", f"unknown strategy {strategy.type!r}")
