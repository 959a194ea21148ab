"""structlog set-up shared by every llmq process: JSON lines off a terminal,
readable lines on one. Every line names its service (and a worker's name);
lines about a request carry its request_id, and trace_id and span_id when it
is traced. Prompts and outputs are logged only with LLMQ_LOG_PROMPTS=1.

Libraries that log through the standard library (aiokafka, aiohttp,
transformers) are rendered by the same processors, so the stream stays one
line per event in one format."""

from __future__ import annotations

import logging
import sys

import structlog

from shared.telemetry import add_trace_ids


def configure_logging(level: str = "info", fmt: str = "auto", **identity: str) -> None:
    """`identity` (service=..., worker=...) is put on every line, llmq's and the libraries'."""
    as_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    renderer = structlog.processors.JSONRenderer() if as_json else structlog.dev.ConsoleRenderer()

    def add_identity(_logger, _method, event: dict) -> dict:
        for key, value in identity.items():
            event.setdefault(key, value)
        return event

    common = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        add_identity,
    ]
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            add_trace_ids,
            *common,
            structlog.processors.format_exc_info if as_json else structlog.processors.StackInfoRenderer(),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    # The libraries' stdlib records, warnings and up, through the same processors.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_logger_name, *common,
                           *([structlog.processors.format_exc_info] if as_json else [])],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    ))
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(logging.WARNING)
    logging.captureWarnings(True)  # Python's warnings too, rather than bare lines on stderr
