"""What every model engine reads from a request the same way: the prompt's token
ids, whether it fits the model's context and whether an adapter name may be
served, so a request means the same thing, and fails with the same words, on
either engine."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from shared.schema import ChatMessage
from shared.training import split_fine_tuned

# One folder name: no separators, no leading dot or underscore, so a client's
# adapter name can never reach outside the adapters directory, nor be peft's
# `__base__` (its name for "no adapter" in a mixed-adapter batch).
ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def prompt_ids(tokenizer: Any, prompt: str | None = None, messages: list[ChatMessage] | None = None) -> list[int]:
    """Token ids of a prompt text or, without one, of a conversation.

    A conversation is rendered by the tokenizer's chat template, or as
    "role: content" lines ending in "assistant:" when it has none. The template
    writes its own special tokens (BOS), so its text is encoded without adding
    them again.
    """
    if prompt is not None:
        return list(tokenizer.encode(prompt))
    turns = [m.model_dump() for m in messages or []]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
        return list(tokenizer.encode(text, add_special_tokens=False))
    text = "".join(f"{t['role']}: {t['content']}\n" for t in turns) + "assistant:"
    return list(tokenizer.encode(text))


def build_hint(source: str) -> str:
    return f"to build the tiny local model there, run `python -m workers.tinymodel {source}`"


def missing_model_dir(source: str) -> str | None:
    """Why LLMQ_MODEL can't be loaded when it is plainly a local path that doesn't exist,
    or None. Either engine would otherwise try it as a hub name: a slow, confusing
    failure (or a surprise download)."""
    if source.startswith((".", "/")) and not Path(source).is_dir():
        return f"model directory {source!r} does not exist; {build_hint(source)}"
    return None


def context_refusal(prompt_tokens: int, max_tokens: int, context: int) -> str | None:
    """Why a prompt of this many tokens, with room for max_tokens more, cannot run in a
    context of this size, or None. A request is refused, never truncated."""
    if max_tokens >= context:
        return f"max_tokens={max_tokens} does not fit the model's context of {context} tokens"
    if prompt_tokens + max_tokens > context:
        return (f"the prompt is {prompt_tokens} tokens; with max_tokens={max_tokens} it needs "
                f"{prompt_tokens + max_tokens}, more than the model's context of {context} tokens "
                f"(shorten the prompt or lower max_tokens)")
    return None


# peft's `peft_type`s (adapter_config.json) that an engine may serve, as a refusal names them.
ADAPTER_KINDS = {"LORA": "LoRA", "IA3": "(IA)^3"}


def adapter_kind(folder: Path) -> str:
    """peft's type of the adapter saved in `folder` ("LORA", "IA3", ...); ValueError when
    its adapter_config.json can't be read or names none."""
    try:
        kind = json.loads((folder / "adapter_config.json").read_text()).get("peft_type")
    except (OSError, ValueError, AttributeError) as exc:
        raise ValueError(f"adapter {folder.name!r} has an unreadable adapter_config.json: {exc}") from exc
    if not isinstance(kind, str):
        raise ValueError(f"adapter {folder.name!r}: its adapter_config.json names no peft_type")
    return kind


def adapter_refusal(root: Path | None, name: str, engine: str = "torch",
                    serves: tuple[str, ...] = ("LORA", "IA3")) -> str | None:
    """Why adapter `name` cannot be served from `root` (None: no adapters) by an engine
    that serves these peft types, or None. Read on each request, so an adapter published
    while the worker runs is served without a restart."""
    if root is None:
        return f"this worker serves no adapters (LLMQ_ADAPTERS_DIR is not set); asked for {name!r}"
    if not ADAPTER_NAME.fullmatch(name):
        return f"invalid adapter name {name!r}"
    if not (root / name / "adapter_config.json").is_file():
        return f"unknown adapter {name!r}"
    try:
        kind = adapter_kind(root / name)
    except ValueError as exc:
        return str(exc)
    if kind not in serves:
        label = ADAPTER_KINDS.get(kind, f"peft {kind}")
        article = "an" if label.startswith("(") else "a"
        served = " and ".join(ADAPTER_KINDS[k] for k in serves)
        return f"adapter {name!r} is {article} {label} adapter; the {engine} engine serves {served} adapters only"
    return None


def missing_model(settings) -> str | None:
    """Why the model LLMQ_MODEL names can't be loaded, when that is plain before loading it,
    or None: a fine-tuned model's name not in the registry, or a local path that doesn't exist."""
    path = settings.model_path
    if settings.fine_tuned_output and not Path(path).is_dir():
        base, output = split_fine_tuned(settings.model)
        why = (f"LLMQ_MODEL {settings.model!r} names a fine-tuned model, but the registry "
               f"(LLMQ_REGISTRY_DIR={str(settings.registry_dir)!r}) has no full model {output!r} at {path!r}")
        adapter = Path(settings.registry_dir) / "adapters" / output
        if adapter.is_dir():
            why += (f"; it is an adapter: serve it from a worker on {base!r} with "
                    f"LLMQ_ADAPTERS_DIR={str(adapter.parent)!r}")
        return why
    return missing_model_dir(path)
