"""An optimized model's registry folder: what a job saves and what workers load.
config.json, the tokenizer, the weights in the format `llmq-model.json`'s "serving"
says ("hf": a plain save_pretrained folder; "int8_dynamic" / "torchao": the quantized
state dict, stored quantized), and `llmq-model.json` (the job's metadata + "serving")."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch

from shared.training import REGISTRY_METADATA
from workers.folders import write_in_place

# The quantized formats' weights: torch.save of the quantized model's state dict (their
# tensors are torch's quantized tensors or torchao's tensor subclasses, which safetensors
# cannot hold), beside config.json and generation_config.json.
QUANTIZED_WEIGHTS = "quantized.pt"
QUANTIZED_FORMATS = ("int8_dynamic", "torchao")


def save(optimized: Any, tokenizer: Any, folder: Path, meta: dict) -> Path:
    """Writes `optimized` (a strategies.Optimized) with its tokenizer at `folder`, atomically;
    `llmq-model.json` is `meta` + the model's "serving" (+ its "figures" unless meta has them).
    OSError when the disk is full."""
    serving = optimized.serving
    if serving["format"] not in ("hf", *QUANTIZED_FORMATS):
        raise ValueError(f"unknown serving format {serving['format']!r}")
    record = {"figures": optimized.figures, **meta, "serving": serving}

    def write(tmp: Path) -> None:
        model = optimized.model
        if serving["format"] == "hf":
            model.save_pretrained(tmp)
        else:
            model.config.save_pretrained(tmp)
            if getattr(model, "generation_config", None) is not None:
                model.generation_config.save_pretrained(tmp)
            torch.save(model.state_dict(), tmp / QUANTIZED_WEIGHTS)
        tokenizer.save_pretrained(tmp)
        (tmp / REGISTRY_METADATA).write_text(json.dumps(record, indent=2) + "\n")

    return write_in_place(Path(folder), write, "saving")


def metadata_of(folder: str | Path) -> dict | None:
    """The folder's llmq-model.json, or None when it has none (a plain model folder)."""
    path = Path(folder) / REGISTRY_METADATA
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def serving_of(folder: str | Path) -> dict | None:
    """How the folder's model is served (llmq-model.json's "serving"), or None when it doesn't say."""
    meta = metadata_of(folder)
    return meta.get("serving") if meta else None


def load_model(folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               attn_implementation: str | None = None) -> Any:
    """The folder's model on `device`, in eval mode, whatever its format. `dtype`: the
    weights' dtype (default: the one it was saved in); quantized formats load only in
    theirs (their scales and kernels were made for it)."""
    serving = serving_of(folder) or {"format": "hf"}
    saved = getattr(torch, serving.get("dtype") or "float32")
    attention = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if serving["format"] == "hf":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or saved, **attention)
        return model.to(device).eval()
    if serving["format"] not in QUANTIZED_FORMATS:
        raise ValueError(f"{folder}: unknown serving format {serving['format']!r}")
    if dtype is not None and dtype != saved:
        raise ValueError(f"{folder} is quantized ({serving['format']}) from {saved} weights: it loads "
                         f"only in {serving['dtype']}, not {dtype}")
    return _load_quantized(Path(folder), serving, saved, torch.device(device), attention)


def _load_quantized(folder: Path, serving: dict, dtype: torch.dtype, device: torch.device, attention: dict):
    """Rebuilt as it was made: the model from its config, quantized the same way, then the
    stored quantized weights loaded into it."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from workers.optimize import quantization

    config = AutoConfig.from_pretrained(folder)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, **attention)
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    model = quantization.requantize(model.eval(), serving)
    with warnings.catch_warnings():
        # torch's own rebuild of quantized tensors still goes through TypedStorage, and says so.
        warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
        # weights_only: torch's quantized tensors and torchao's tensor subclasses (which torchao
        # registers as safe globals) load without unpickling arbitrary objects.
        state = torch.load(folder / QUANTIZED_WEIGHTS, map_location="cpu", weights_only=True)
    # assign: torchao's weights are tensor subclasses that replace the freshly quantized ones
    # rather than being copied into them.
    model.load_state_dict(state, assign=serving["format"] == "torchao")
    return model.to(device).eval()
