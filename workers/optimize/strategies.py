"""Applying one strategy (shared/optimization.py) to a loaded model: what a job's run
and the strategies bench both call, so a bench row is exactly what a job publishes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

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


# (model, tokenizer, train examples, recovery settings) -> the model, fine-tuned; see tune.py.
Tune = Callable[..., Any]


def apply(strategy, model: Any, tokenizer: Any, *, data: Data | None, tune: Tune | None) -> Optimized:
    """The strategy applied to `model` (which it may change in place). `data` and `tune` are
    given when the job has a training file; strategies that train need them."""
    raise NotImplementedError
