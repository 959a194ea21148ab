"""`gateway`: serve the llmq HTTP API."""

from __future__ import annotations

from aiohttp import web

from gateway.app import Gateway
from gateway.settings import GatewaySettings
from shared.logs import configure_logging
from shared.settings import parse_settings as parse_settings_of
from shared.telemetry import configure_tracing


def parse_settings(argv: list[str] | None = None) -> GatewaySettings:
    (settings,) = parse_settings_of(argv, "gateway", __doc__, GatewaySettings)
    return settings


def main(argv: list[str] | None = None) -> None:
    settings = parse_settings(argv)
    configure_logging(settings.log_level, settings.log_format, service="llmq-gateway")
    tracing = configure_tracing("llmq-gateway")
    gateway = Gateway(settings, tracing)
    try:
        web.run_app(gateway.app, host=settings.http_host, port=settings.http_port, print=None,
                    access_log=None, shutdown_timeout=10)
    finally:
        tracing.shutdown()


if __name__ == "__main__":
    main()
