"""Engines behind one interface (workers/engines/base.py), chosen by LLMQ_ENGINE."""

from __future__ import annotations

from workers.engines.base import Engine, EngineError, GenerationOutput, GenerationRequest, GenerationResult, collect
from workers.settings import WorkerSettings

__all__ = ["Engine", "EngineError", "GenerationOutput", "GenerationRequest", "GenerationResult", "collect",
           "load_engine"]


def load_engine(settings: WorkerSettings) -> Engine:
    """Build the configured engine; heavy imports happen only for the one chosen."""
    if settings.engine == "echo":
        from workers.engines.echo import EchoEngine

        return EchoEngine(settings)
    if settings.engine == "torch":
        from workers.engines.torch.engine import TorchEngine

        return TorchEngine(settings)
    if settings.engine == "vllm":
        from workers.engines.vllm.engine import VllmEngine

        return VllmEngine(settings)
    raise EngineError(f"unknown engine {settings.engine!r}")
