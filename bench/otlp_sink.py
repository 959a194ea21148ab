"""An OTLP/HTTP trace receiver for benchmarks: accepts exports like a collector
that keeps up, and counts the spans in them by name, so a benchmark can check
that every span it caused was really exported. `python -m bench.otlp_sink --port N`;
`GET /stats` answers the counts."""

from __future__ import annotations

import argparse
from collections import Counter

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    received = {"exports": 0, "bytes": 0, "spans": 0}
    spans_by_name: Counter[str] = Counter()

    async def traces(request: web.Request) -> web.Response:
        body = await request.read()
        received["exports"] += 1
        received["bytes"] += len(body)
        # Decoded (upb, in C) only as far as the span names: a collector decodes at least that much.
        for resource_spans in ExportTraceServiceRequest.FromString(body).resource_spans:
            for scope_spans in resource_spans.scope_spans:
                received["spans"] += len(scope_spans.spans)
                spans_by_name.update(span.name for span in scope_spans.spans)
        # An empty ExportTraceServiceResponse serialises to no bytes.
        return web.Response(body=b"", content_type="application/x-protobuf")

    async def stats(_request: web.Request) -> web.Response:
        return web.json_response({**received, "spans_by_name": spans_by_name})

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/traces", traces)
    app.router.add_get("/stats", stats)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
