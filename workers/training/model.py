"""The model a job trains, per method: the base model with peft LoRA adapters, with
peft (IA)^3 vectors, or the whole base model (every weight trained)."""

from __future__ import annotations

from typing import Any

from shared.training import Method


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_base(source: str, device: str) -> tuple[Any, Any]:
    """(model, tokenizer) of the base model, float32 (the trainer's bf16 autocast runs on CUDA)."""
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).to(device)
    return model, tokenizer


def load_tokenizer(source: str) -> Any:
    """The model's tokenizer, set up for training and evaluation."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    # Training pads on the right: with left padding the positions of a short example would
    # shift by its padding, and training and serving would see different positions.
    tokenizer.padding_side = "right"
    return tokenizer


def trainable(base: Any, method: Method) -> Any:
    """The model to train: peft wraps the base for lora and adapter; full trains it as is."""
    from peft import IA3Config, LoraConfig, TaskType, get_peft_model

    hp = method.hyperparameters
    if method.type == "lora":
        config = LoraConfig(task_type=TaskType.CAUSAL_LM, r=hp.rank, lora_alpha=hp.alpha,
                            lora_dropout=hp.dropout, target_modules=hp.target_modules)
    elif method.type == "adapter":
        config = IA3Config(task_type=TaskType.CAUSAL_LM, target_modules=list(hp.target_modules),
                           feedforward_modules=list(hp.feedforward_modules))
    else:
        return base
    return get_peft_model(base, config)


def target_error(exc: Exception) -> str | None:
    """The user's words for peft refusing a job's target_modules (None: another error)."""
    text = str(exc)
    if "Target modules" in text or "target_modules" in text or "not found in the base model" in text:
        return f"target_modules do not match the base model's modules: {text.splitlines()[0]}"
    return None
