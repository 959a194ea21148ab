"""Tracing: one OpenTelemetry trace per request, from the gateway's HTTP span
through the Kafka message headers (W3C traceparent) to the worker's spans.

Configured by the standard variables (OTEL_EXPORTER_OTLP_ENDPOINT or
OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, OTEL_SERVICE_NAME, OTEL_TRACES_SAMPLER,
OTEL_BSP_*, OTEL_SDK_DISABLED). Each process chooses its `Tracing` once at
start-up (`configure_tracing`): with no endpoint set, no SDK is installed and
`NO_TRACING` makes no spans at all; otherwise `SdkTracing` makes and exports them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractContextManager

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind

# OpenTelemetry's messaging semantic-convention attribute names, spelled once.
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
# a few seconds of a busy gateway's spans while the export thread catches up,
# and batches twice the SDK's 512: fewer, larger OTLP POSTs.
_BSP_DEFAULTS = {"OTEL_BSP_MAX_QUEUE_SIZE": ("max_queue_size", 16384),
                 "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": ("max_export_batch_size", 1024)}


def tracing_configured() -> bool:
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return bool(os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


class _NoSpanScope:
    """`with` over no span: what the no-op tracing hands out, one shared instance."""

    def __enter__(self) -> Span:
        return trace.INVALID_SPAN

    def __exit__(self, *_exc) -> None:
        return None


_NO_SPAN_SCOPE = _NoSpanScope()
_NO_CONTEXT = Context()


class Tracing:
    """A process's spans when no OTLP endpoint is set: none. Each method is a
    cheap no-op (no header parsing, no span objects), so call sites read the
    same whether tracing is on or off; `configure_tracing` picks `SdkTracing`
    instead, once, at start-up, when traces are exported."""

    def server_span(self, method: str, route: str, headers: Mapping[str, str]) -> AbstractContextManager[Span]:
        """The span of one HTTP request, current while the handler runs."""
        return _NO_SPAN_SCOPE

    def producer_span(self, topic: str, key: str) -> AbstractContextManager[Span]:
        """The span of producing one message to `topic` (none for an unsampled trace)."""
        return _NO_SPAN_SCOPE

    def inject(self, headers: list[tuple[str, bytes]], span: Span) -> list[tuple[str, bytes]]:
        """Kafka `headers` plus the trace context of `span` (or the current one, when it
        records nothing), so the consumer continues the same trace."""
        return headers

    def message_context(self, headers: Sequence[tuple[str, bytes]] | None) -> Context:
        """The trace context a Kafka message carries; an empty one starts a new trace."""
        return _NO_CONTEXT

    def start_span(self, name: str, *, context: Context | None = None, kind: SpanKind = SpanKind.INTERNAL,
                   attributes: Mapping | None = None, start_time: int | None = None) -> Span:
        """A span the caller ends."""
        return trace.INVALID_SPAN

    def headers_of(self, span: Span) -> dict[str, str]:
        """W3C trace headers naming `span` as the parent (for engines that trace themselves)."""
        return {}

    def link(self, span: Span, contexts: Iterable[Context]) -> None:
        """Link `span` to the traces of `contexts`, if it records (for an unsampled one, nothing
        is looked up: its links would be dropped)."""

    def shutdown(self) -> None:
        """Flush what is still queued for export."""


NO_TRACING = Tracing()


class _ServerSpanScope:
    """A server span current in the context while the handler runs: start_span and one
    attach/detach rather than start_as_current_span, the same span and context without
    its context-manager layers on every request."""

    __slots__ = ("span", "token")

    def __init__(self, span: Span, parent: Context) -> None:
        self.span = span
        self.token = otel_context.attach(trace.set_span_in_context(span, parent))

    def __enter__(self) -> Span:
        return self.span

    def __exit__(self, _type, exc, _tb) -> None:
        if exc is not None:
            self.span.set_status(trace.StatusCode.ERROR, repr(exc))
        otel_context.detach(self.token)
        self.span.end()


class _SpanScope:
    __slots__ = ("span",)

    def __init__(self, span: Span) -> None:
        self.span = span

    def __enter__(self) -> Span:
        return self.span

    def __exit__(self, _type, exc, _tb) -> None:
        if exc is not None:
            self.span.set_status(trace.StatusCode.ERROR, repr(exc))
        self.span.end()


class SdkTracing(Tracing):
    """Spans made by the OpenTelemetry SDK and exported by `provider`."""

    def __init__(self, provider) -> None:
        self.provider = provider
        # The SDK's tracer itself, not the API's proxy.
        self.tracer = provider.get_tracer("llmq")
        # The headers the configured propagators read (traceparent, tracestate, baggage):
        # a request carrying none of them skips extraction.
        self._propagation_fields = frozenset(propagate.get_global_textmap().fields)

    def server_span(self, method, route, headers):
        parent = (propagate.extract(headers) if any(f in headers for f in self._propagation_fields)
                  else _NO_CONTEXT)
        span = self.tracer.start_span(f"{method} {route}", context=parent, kind=SpanKind.SERVER,
                                      attributes={"http.request.method": method, "http.route": route})
        return _ServerSpanScope(span, parent)

    def producer_span(self, topic, key):
        if not trace.get_current_span().is_recording():
            # Not sampled: the SDK's samplers (parent-based, or by trace id) would drop
            # every span of this trace, so none is made; the message still carries the
            # trace context (flagged unsampled), so the consumer follows the same decision.
            return _NO_SPAN_SCOPE
        return _SpanScope(self.tracer.start_span(
            f"publish {topic}", kind=SpanKind.PRODUCER,
            attributes={MESSAGING_SYSTEM: "kafka", DESTINATION: topic, OPERATION_TYPE: "send", MESSAGE_KEY: key},
        ))

    def inject(self, headers, span):
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=trace.set_span_in_context(span) if span.is_recording() else None)
        return headers + [(key, value.encode()) for key, value in carrier.items()]

    def message_context(self, headers):
        carrier = {}
        for key, value in headers or ():
            try:
                carrier[key.lower()] = value.decode()
            except (UnicodeDecodeError, AttributeError):
                continue  # a garbage header must not stop the message
        return propagate.extract(carrier)

    def start_span(self, name, *, context=None, kind=SpanKind.INTERNAL, attributes=None, start_time=None):
        return self.tracer.start_span(name, context=context, kind=kind, attributes=attributes, start_time=start_time)

    def headers_of(self, span):
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=trace.set_span_in_context(span))
        return carrier

    def link(self, span, contexts):
        if span.is_recording():
            for link in _links_to(contexts):
                span.add_link(link.context)

    def shutdown(self) -> None:
        self.provider.shutdown()


def configure_tracing(default_service_name: str) -> Tracing:
    """`SdkTracing` exporting over OTLP/HTTP if an endpoint is configured, else `NO_TRACING`.

    Call `shutdown()` on what it returns before the process exits, to flush.
    """
    if not tracing_configured():
        return NO_TRACING
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
    return SdkTracing(provider)


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


def _links_to(contexts: Iterable[Context]) -> list[trace.Link]:
    spans = (trace.get_current_span(ctx).get_span_context() for ctx in contexts)
    return [trace.Link(span) for span in spans if span.is_valid]


def _hashed_once(resource):
    """`resource` with its hash computed once. The OTLP encoder groups spans by resource,
    hashing it for every span it encodes, and Resource.__hash__ serialises all the
    attributes to JSON each time (upstream notes the waste in
    opentelemetry-python#5577). A process' resource never changes after start-up."""
    from opentelemetry.sdk.resources import Resource  # here: the SDK is imported only when tracing

    class HashedOnce(Resource):
        def __init__(self, attributes, schema_url):
            super().__init__(attributes, schema_url)
            self._hash = super().__hash__()

        def __hash__(self):
            return self._hash

    return HashedOnce(resource.attributes, resource.schema_url)
