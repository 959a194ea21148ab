"""`worker`: run one llmq worker until SIGTERM/SIGINT, then drain and leave the group."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

import structlog

from shared.logs import configure_logging
from shared.settings import Settings, settings_from_cli
from shared.telemetry import Tracing, configure_tracing
from workers.engines import EngineError
from workers.worker import Worker


def parse_settings(argv: list[str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(prog="worker", description=__doc__)
    parser.add_argument("--engine", choices=["torch", "vllm", "echo"], help="LLMQ_ENGINE")
    parser.add_argument("--model", help="LLMQ_MODEL: local path or hub name")
    parser.add_argument("--kafka-bootstrap", help="LLMQ_KAFKA_BOOTSTRAP")
    parser.add_argument("--redis-url", help="LLMQ_REDIS_URL")
    parser.add_argument("--request-topic", help="LLMQ_REQUEST_TOPIC")
    parser.add_argument("--batch-max-size", type=int, help="LLMQ_BATCH_MAX_SIZE")
    return settings_from_cli(parser, argv)


async def serve(settings: Settings, tracing: Tracing) -> None:
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
