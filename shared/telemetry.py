"""Tracing: one OpenTelemetry trace per request, from the gateway's HTTP span
through the Kafka message headers (W3C traceparent) to the worker's spans.

Configured by the standard variables (OTEL_EXPORTER_OTLP_ENDPOINT or
OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, OTEL_SERVICE_NAME, OTEL_TRACES_SAMPLER,
OTEL_BSP_*, OTEL_SDK_DISABLED). With no endpoint set, no SDK is installed:
every span is the API's no-op span and nothing is exported.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanContext

tracer = trace.get_tracer("llmq")

# Messaging semantic-convention attribute names (REFERENCE.md), spelled once.
MESSAGING_SYSTEM = "messaging.system"
DESTINATION = "messaging.destination.name"
PARTITION = "messaging.destination.partition.id"
CONSUMER_GROUP = "messaging.consumer.group.name"
MESSAGE_KEY = "messaging.kafka.message.key"
OFFSET = "messaging.kafka.offset"
BATCH_COUNT = "messaging.batch.message_count"
OPERATION_TYPE = "messaging.operation.type"
REQUEST_ID = "llmq.request_id"

# BatchSpanProcessor sizes where OTEL_BSP_* leaves them unset: a queue that rides out
# a few seconds of a busy gateway (~4,000 spans/s) while the export thread catches up,
# and batches twice the SDK's 512: fewer, larger OTLP POSTs.
_BSP_DEFAULTS = {"OTEL_BSP_MAX_QUEUE_SIZE": ("max_queue_size", 16384),
                 "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": ("max_export_batch_size", 1024)}


def tracing_configured() -> bool:
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return bool(os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


def configure_tracing(default_service_name: str):
    """Install an OTLP/HTTP-exporting tracer provider if an endpoint is configured.

    Returns the provider (call `shutdown_tracing` on exit to flush) or None.
    """
    if not tracing_configured():
        return None
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": default_service_name}
    # TracerProvider reads OTEL_TRACES_SAMPLER itself.
    provider = TracerProvider(resource=_hashed_once(Resource.create(attributes)))
    sizes = {arg: default for env, (arg, default) in _BSP_DEFAULTS.items() if env not in os.environ}
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(), **sizes))
    trace.set_tracer_provider(provider)
    return provider


def shutdown_tracing(provider) -> None:
    if provider is not None:
        provider.shutdown()  # flushes what is still queued


def inject_headers(headers: list[tuple[str, bytes]], context: Context | None = None) -> list[tuple[str, bytes]]:
    """`headers` plus traceparent/tracestate of `context` (default: the current one), as Kafka headers."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=context)
    return headers + [(key, value.encode()) for key, value in carrier.items()]


def extract_context(headers: Sequence[tuple[str, bytes]] | None) -> Context:
    """The trace context a Kafka message carries; an empty one starts a new trace."""
    carrier = {}
    for key, value in headers or ():
        try:
            carrier[key.lower()] = value.decode()
        except (UnicodeDecodeError, AttributeError):
            continue  # a garbage header must not stop the message
    return propagate.extract(carrier)


def span_context_of(context: Context) -> SpanContext:
    return trace.get_current_span(context).get_span_context()


def log_ids(span: Span) -> dict[str, str]:
    """trace_id/span_id for a log line about this span's work (empty when not traced)."""
    ctx = span.get_span_context()
    if not ctx.is_valid:
        return {}
    return {"trace_id": format(ctx.trace_id, "032x"), "span_id": format(ctx.span_id, "016x")}


def add_trace_ids(_logger, _method, event: dict) -> dict:
    """structlog processor: the current span's ids on every line logged inside it."""
    if "trace_id" not in event:
        event.update(log_ids(trace.get_current_span()))
    return event


def links_to(contexts: Iterable[Context]) -> list[trace.Link]:
    return [trace.Link(ctx) for ctx in map(span_context_of, contexts) if ctx.is_valid]


def _hashed_once(resource):
    """`resource` with its hash computed once. The OTLP encoder groups spans by resource,
    hashing it for every span it encodes, and Resource.__hash__ serialises all the
    attributes to JSON each time (~15 µs a span here; upstream notes the waste in
    opentelemetry-python#5577). A process' resource never changes after start-up."""
    from opentelemetry.sdk.resources import Resource  # here: the SDK is imported only when tracing

    class HashedOnce(Resource):
        def __init__(self, attributes, schema_url):
            super().__init__(attributes, schema_url)
            self._hash = super().__hash__()

        def __hash__(self):
            return self._hash

    return HashedOnce(resource.attributes, resource.schema_url)
