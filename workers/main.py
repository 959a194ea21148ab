"""`worker`: run one llmq worker until SIGTERM/SIGINT, then drain and leave the group."""

from __future__ import annotations

import asyncio
import signal
import sys

import structlog

from shared.logs import configure_logging
from shared.settings import parse_settings as parse_settings_of
from shared.telemetry import Tracing, configure_tracing
from workers.engines import EngineError
from workers.settings import WorkerSettings
from workers.worker import Worker, worker_name


def parse_settings(argv: list[str] | None = None) -> WorkerSettings:
    (settings,) = parse_settings_of(argv, "worker", __doc__, WorkerSettings)
    return settings


async def serve(settings: WorkerSettings, tracing: Tracing, name: str) -> None:
    worker = Worker(settings, name=name, tracing=tracing)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    await worker.run()


def route_transformers_logs() -> None:
    """transformers logs through a handler of its own and draws progress bars (a model's
    "Loading weights"): hand its records to the process's log lines instead, and draw none."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()
    hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> None:
    settings = parse_settings(argv)
    name = worker_name()
    configure_logging(settings.log_level, settings.log_format, service="llmq-worker", worker=name)
    if settings.engine in ("torch", "vllm"):
        route_transformers_logs()
    tracing = configure_tracing("llmq-worker")
    try:
        asyncio.run(serve(settings, tracing, name))
    except EngineError as exc:
        structlog.get_logger("worker").error("engine_failed", error=str(exc))
        sys.exit(2)
    finally:
        tracing.shutdown()


if __name__ == "__main__":
    main()
