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
from workers.worker import Worker


def parse_settings(argv: list[str] | None = None) -> WorkerSettings:
    (settings,) = parse_settings_of(argv, "worker", __doc__, WorkerSettings)
    return settings


async def serve(settings: WorkerSettings, tracing: Tracing) -> None:
    worker = Worker(settings, tracing=tracing)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    await worker.run()


def main(argv: list[str] | None = None) -> None:
    settings = parse_settings(argv)
    configure_logging(settings.log_level, settings.log_format)
    tracing = configure_tracing("llmq-worker")
    try:
        asyncio.run(serve(settings, tracing))
    except EngineError as exc:
        structlog.get_logger("worker").error("engine_failed", error=str(exc))
        sys.exit(2)
    finally:
        tracing.shutdown()


if __name__ == "__main__":
    main()
