"""`gateway`: serve the llmq HTTP API."""

from __future__ import annotations

import argparse

from aiohttp import web

from gateway.app import Gateway
from shared.logs import configure_logging
from shared.settings import Settings, settings_from_cli
from shared.telemetry import configure_tracing


def parse_settings(argv: list[str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(prog="gateway", description=__doc__)
    parser.add_argument("--host", dest="http_host", help="LLMQ_HTTP_HOST")
    parser.add_argument("--port", dest="http_port", type=int, help="LLMQ_HTTP_PORT")
    parser.add_argument("--kafka-bootstrap", help="LLMQ_KAFKA_BOOTSTRAP")
    parser.add_argument("--redis-url", help="LLMQ_REDIS_URL")
    parser.add_argument("--request-topic", help="LLMQ_REQUEST_TOPIC")
    return settings_from_cli(parser, argv)


def main(argv: list[str] | None = None) -> None:
    settings = parse_settings(argv)
    configure_logging(settings.log_level, settings.log_format)
    tracing = configure_tracing("llmq-gateway")
    gateway = Gateway(settings, tracing)
    try:
        web.run_app(gateway.app, host=settings.http_host, port=settings.http_port, print=None,
                    access_log=None, shutdown_timeout=10)
    finally:
        tracing.shutdown()


if __name__ == "__main__":
    main()
