"""Ports on this machine's loopback: a free one, or whether one is free.

Used wherever llmq starts processes on one host (the dev stack, the local
scaler backend's workers, the tests)."""

from __future__ import annotations

import socket


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True
