"""The quantization strategies: PyTorch dynamic INT8 (what LLMQ_QUANTIZE=int8 does at load
too), torchao weight-only INT8/INT4, and QAT (a short fine-tune with torchao's fake-quantized
linears, then converted to the same weight-only format). Each records in "serving" what
artifact.load_model needs to rebuild it, and `requantize` is that rebuild."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from workers.optimize.strategies import (
    Optimized,
    StrategyError,
    Tune,
    dtype_name,
    parameter_count,
)


def quantize_int8_dynamic(model: Any) -> Any:
    """The model with its linear layers dynamically quantized (weights int8, activations
    quantized per batch on the fly): the linear layers are most of a decode step's time and
    memory. Needs float32 weights on the CPU (its kernels are fbgemm/onednn's)."""
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        # torch 2.13 marks torch.ao.quantization deprecated in favour of torchao, whose
        # equivalent (Int8DynamicActivationInt8WeightConfig) has no fast CPU kernel here;
        # quantize_dynamic is still what runs int8 matmuls on this CPU.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
        # In place: a copy would hold the float weights twice at the peak.
        return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)


def int8_dynamic(model: Any) -> Optimized:
    parameters = parameter_count(model)
    linears = _linears(model)
    # Dynamic quantization has float32 CPU kernels only; a bf16 or GPU source is brought there.
    model = quantize_int8_dynamic(model.to("cpu", torch.float32).eval())
    return Optimized(model, serving={"format": "int8_dynamic", "dtype": "float32"},
                     figures={"parameters": parameters, "quantized_linears": linears, "weight_bits": 8})


def weight_only(model: Any, strategy) -> Optimized:
    """torchao weight-only quantization of every linear layer: INT8 per output channel or
    INT4 in groups of `strategy.group_size` input channels (activations stay in float)."""
    serving = _torchao_serving(strategy.bits, strategy.group_size, dtype_name(model))
    parameters, linears = parameter_count(model), _linears(model)
    _quantize_here(model, _torchao_config(serving))
    return Optimized(model, serving=serving, figures=_torchao_figures(parameters, linears, serving))


def qat(model: Any, strategy, tune: Tune | None) -> Optimized:
    """Quantization-aware training: the linears fake-quantized (quantized and dequantized in
    each forward, so training sees the rounding), `strategy.training` of fine-tuning, then
    converted to the weight-only format `weight_only` makes with the same bits and group size.

    torchao's QAT rather than torch.ao.quantization's eager QAT: that one needs QuantStub/
    DeQuantStub placed in the model and only converts to int8 static quantization, and torch
    2.13 marks torch.ao.quantization deprecated in favour of torchao (PyTorch's maintained
    quantization library), whose QATConfig converts straight to its weight-only configs."""
    if tune is None:
        raise StrategyError("training_file_required", "qat fine-tunes the model: the job needs a training_file")
    from torchao.quantization import quantize_
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

    serving = _torchao_serving(strategy.bits, strategy.group_size, dtype_name(model))
    base = _torchao_config(serving)
    parameters, linears = parameter_count(model), _linears(model)
    if strategy.bits == 4:
        prepare = QATConfig(base, step="prepare")  # fake quantization inferred from IntxWeightOnlyConfig
    else:
        # torchao infers no fake quantization from Int8WeightOnlyConfig: the same numerics,
        # int8 symmetric per output channel, stated directly.
        prepare = QATConfig(weight_config=IntxFakeQuantizeConfig(torch.int8, "per_channel", is_symmetric=True),
                            step="prepare")
    quantize_(model, prepare)
    tune(model, strategy.training)
    model.eval()
    _quantize_here(model, QATConfig(base, step="convert"))
    figures = _torchao_figures(parameters, linears, serving)
    figures["qat_epochs"] = strategy.training.n_epochs
    return Optimized(model, serving=serving, figures=figures)


def requantize(model: Any, serving: dict) -> Any:
    """A freshly built model quantized as the artifact's was, so its stored quantized weights load into it."""
    if serving["format"] == "int8_dynamic":
        return quantize_int8_dynamic(model)
    if serving["format"] == "torchao":
        from torchao.quantization import quantize_

        quantize_(model, _torchao_config(serving))
        return model
    raise ValueError(f"{serving['format']!r} is not a quantized format")


# ---- torchao -----------------------------------------------------------------------


def _torchao_serving(bits: int, group_size: int, dtype: str) -> dict:
    config = "Int8WeightOnlyConfig" if bits == 8 else "IntxWeightOnlyConfig"
    serving = {"format": "torchao", "dtype": dtype, "config": config, "bits": bits}
    if bits == 4:
        serving["group_size"] = group_size
    return serving


def _torchao_config(serving: dict):
    """torchao's config named in `serving`, with its settings: what quantize_ applies at the
    job and again at load."""
    from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup

    if serving["config"] == "Int8WeightOnlyConfig":
        return Int8WeightOnlyConfig()
    if serving["config"] == "IntxWeightOnlyConfig":
        # IntxWeightOnlyConfig, not Int4WeightOnlyConfig: the latter's kernels come from the
        # `mslk` package (CUDA builds only); Intx's run on any device (int4 values held in int8).
        return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(serving["group_size"]))
    raise ValueError(f"unknown torchao config {serving['config']!r}")


def _quantize_here(model: Any, config) -> None:
    """quantize_ with `config`, then one forward pass: a kernel this machine lacks shows up in
    either, as StrategyError("not_available_here")."""
    from torchao.quantization import quantize_

    try:
        quantize_(model, config)
        with torch.inference_mode():
            model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=next(model.parameters()).device))
    except (ImportError, NotImplementedError) as exc:
        raise StrategyError("not_available_here", f"{type(config).__name__} cannot run here: {exc}") from exc
    except RuntimeError as exc:
        if "kernel" not in str(exc).lower() and "not implemented" not in str(exc).lower():
            raise
        raise StrategyError("not_available_here", f"{type(config).__name__} cannot run here: {exc}") from exc


def _torchao_figures(parameters: int, linears: int, serving: dict) -> dict:
    figures = {"parameters": parameters, "quantized_linears": linears, "weight_bits": serving["bits"]}
    if serving["bits"] == 4:
        figures["group_size"] = serving["group_size"]
        # torchao's portable int4 layout keeps one value per int8: half the size on disk
        # that a packed layout would give, and the same as INT8.
        figures["stored_bits"] = 8
    return figures


# ---- figures -----------------------------------------------------------------------


def _linears(model: Any) -> int:
    return sum(isinstance(m, torch.nn.Linear) for m in model.modules())
