"""What every process's Prometheus metrics share: a registry of their own (so
tests can run several in one process) and, for the processes without an HTTP
server of their own (worker, scaler), a /metrics endpoint on a port."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, start_http_server


class ServedMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._server = None

    def serve(self, port: int, host: str) -> None:
        """Serve /metrics on host:port from a thread; port 0 serves nothing."""
        if port:
            self._server, _thread = start_http_server(port, addr=host, registry=self.registry)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
