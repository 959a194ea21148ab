"""`trainer`: run one llmq trainer (fine-tuning and optimization jobs, one at a time) until
SIGTERM/SIGINT, then stop the job in hand at a checkpoint and leave the group."""

from __future__ import annotations

import asyncio
import signal

from shared.logs import configure_logging
from shared.settings import parse_settings as parse_settings_of
from shared.telemetry import Tracing, configure_tracing
from workers.main import route_transformers_logs
from workers.training.service import TrainingWorker
from workers.training.settings import TrainerSettings
from workers.worker import worker_name


def parse_settings(argv: list[str] | None = None) -> TrainerSettings:
    (settings,) = parse_settings_of(argv, "trainer", __doc__, TrainerSettings)
    return settings


async def serve(settings: TrainerSettings, tracing: Tracing, name: str) -> None:
    trainer = TrainingWorker(settings, name=name, tracing=tracing)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, trainer.stop)
    await trainer.run()


def main(argv: list[str] | None = None) -> None:
    settings = parse_settings(argv)
    name = worker_name()
    configure_logging(settings.log_level, settings.log_format, service="llmq-trainer", trainer=name)
    route_transformers_logs()
    tracing = configure_tracing("llmq-trainer")
    try:
        asyncio.run(serve(settings, tracing, name))
    finally:
        tracing.shutdown()


if __name__ == "__main__":
    main()
