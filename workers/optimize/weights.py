"""Strategies that change a model's weights without changing its shapes: `precision`
(every floating-point weight cast to float32, bfloat16 or float16) and `merge_lora` (a
LoRA fine-tune's adapter folded into its base's weights, served as a plain model)."""

from __future__ import annotations

from typing import Any

import torch

from workers.optimize.strategies import (
    Optimized,
    StrategyError,
    dtype_name,
    parameter_count,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def precision(model: Any, strategy) -> Optimized:
    device = next(model.parameters()).device
    if strategy.dtype == "float16" and device.type != "cuda":
        # CPU kernels for float16 are slow or missing (many ops upcast per call); bfloat16
        # runs natively on CPUs with AVX-512 BF16 / AMX, so that is what CPU gets.
        raise StrategyError("not_available_here",
                            f"float16 is for CUDA: this model runs on {device.type}; use bfloat16 here")
    before = dtype_name(model)
    # Buffers that aren't saved (rotary inv_freq) keep their dtype: from_pretrained builds
    # them in float32 whatever the weights' dtype, so the model evaluated here is the one served.
    saved = model.state_dict().keys()
    unsaved = {name: buffer for name, buffer in model.named_buffers() if name not in saved}
    model.to(DTYPES[strategy.dtype])  # floating-point parameters and buffers only
    for name, buffer in unsaved.items():
        module, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(module), leaf, buffer)
    # What save_pretrained records and from_pretrained(dtype="auto") reads.
    model.config.dtype = DTYPES[strategy.dtype]
    return Optimized(model, serving={"format": "hf", "dtype": strategy.dtype},
                     figures={"dtype_before": before, "dtype_after": strategy.dtype,
                              "parameters": parameter_count(model),
                              "bytes_per_parameter": DTYPES[strategy.dtype].itemsize})


def merge_lora(model: Any) -> Optimized:
    from peft import PeftModel

    if not isinstance(model, PeftModel) or any(c.peft_type.value != "LORA" for c in model.peft_config.values()):
        raise StrategyError("invalid_source", "merge_lora needs a LoRA fine-tune as its source model "
                                              f"(got {type(model).__name__})")
    adapter_parameters = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    merged = model.merge_and_unload()
    return Optimized(merged, serving={"format": "hf", "dtype": dtype_name(merged)},
                     figures={"parameters": parameter_count(merged), "adapter_parameters_merged": adapter_parameters})
