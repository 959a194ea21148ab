"""What `llmq up` hands the processes it starts: the gateway's and the workers'
settings in one object (each process reads its own part of the environment it
is given). The tests and benchmarks build their stacks from it too."""

from __future__ import annotations

from gateway.settings import GatewaySettings
from workers.settings import WorkerSettings


class StackSettings(GatewaySettings, WorkerSettings):
    pass
