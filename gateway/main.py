"""`gateway`: serve the llmq HTTP API."""

from __future__ import annotations

import gc

from aiohttp import web

from gateway.app import Gateway
from gateway.settings import GatewaySettings
from shared.logs import configure_logging
from shared.settings import parse_settings as parse_settings_of
from shared.telemetry import configure_tracing


def parse_settings(argv: list[str] | None = None) -> GatewaySettings:
    (settings,) = parse_settings_of(argv, "gateway", __doc__, GatewaySettings)
    return settings


async def _freeze_start_up_objects(_app: web.Application) -> None:
    """Keep what start-up made (modules, schemas, clients: ~90,000 objects, kept for the
    process' life) out of Python's garbage collector. A full collection walks every
    tracked object, ~15 ms here with them, and runs from inside whatever request or
    batch slice allocates at that moment; frozen, it walks only what came after.
    (What gc.freeze is for; a process-wide choice, so made here rather than in Gateway,
    which tests also run in-process.)"""
    gc.collect()
    gc.freeze()


def main(argv: list[str] | None = None) -> None:
    settings = parse_settings(argv)
    configure_logging(settings.log_level, settings.log_format, service="llmq-gateway")
    tracing = configure_tracing("llmq-gateway")
    gateway = Gateway(settings, tracing)
    gateway.app.on_startup.append(_freeze_start_up_objects)  # after the Gateway's own start
    try:
        web.run_app(gateway.app, host=settings.http_host, port=settings.http_port, print=None,
                    access_log=None, shutdown_timeout=10)
    finally:
        tracing.shutdown()


if __name__ == "__main__":
    main()
