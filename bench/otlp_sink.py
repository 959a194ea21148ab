"""An OTLP/HTTP trace receiver for benchmarks: accepts and counts exports,
like a collector that keeps up. `python -m bench.otlp_sink --port N`."""

from __future__ import annotations

import argparse

from aiohttp import web


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    received = {"exports": 0, "bytes": 0}

    async def traces(request: web.Request) -> web.Response:
        received["exports"] += 1
        received["bytes"] += len(await request.read())
        # An empty ExportTraceServiceResponse serialises to no bytes.
        return web.Response(body=b"", content_type="application/x-protobuf")

    async def stats(_request: web.Request) -> web.Response:
        return web.json_response(received)

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/traces", traces)
    app.router.add_get("/stats", stats)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
