"""`scaler`: keep the number of llmq workers in step with the request queue.

  scaler --backend local --min 0 --max 4            worker processes on this machine
  scaler --backend kubernetes --deployment llmq-worker --namespace llmq
  scaler --dry-run                                   print each decision and why; act on nothing

Every flag is also an environment variable: LLMQ_SCALER_<FLAG> (LLMQ_SCALER_MIN,
LLMQ_SCALER_MAX, ...); Kafka and worker settings are the usual LLMQ_* ones.
Flags win over the environment. SIGINT/SIGTERM: the local backend stops its
workers (each drains: finishes its batch, commits, leaves the group) and exits.
"""

from __future__ import annotations

import asyncio
import signal
import sys

from scaler.settings import ScalerSettings
from shared.logs import configure_logging
from shared.settings import ServiceSettings, parse_settings


def parse(argv: list[str] | None = None) -> tuple[ServiceSettings, ScalerSettings]:
    return parse_settings(argv, "scaler", __doc__, ServiceSettings, ScalerSettings)


def make_backend(settings: ServiceSettings, scaler_settings: ScalerSettings):
    if scaler_settings.backend == "kubernetes":
        from scaler.backends.kubernetes import KubernetesBackend

        return KubernetesBackend.from_settings(scaler_settings)
    from scaler.backends.local import LocalBackend

    return LocalBackend(settings, scaler_settings)


async def serve(settings: ServiceSettings, scaler_settings: ScalerSettings) -> None:
    from scaler.daemon import Scaler

    echo = (lambda line: print(line, flush=True)) if scaler_settings.dry_run else None
    scaler = Scaler(settings, scaler_settings, make_backend(settings, scaler_settings), echo=echo)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, scaler.stop)
    await scaler.run()


def main(argv: list[str] | None = None) -> None:
    settings, scaler_settings = parse(argv)
    configure_logging(settings.log_level, settings.log_format, service="llmq-scaler")
    try:
        asyncio.run(serve(settings, scaler_settings))
    except KeyboardInterrupt:  # a second Ctrl-C during shutdown
        sys.exit(130)


if __name__ == "__main__":
    main()
