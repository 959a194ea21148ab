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

import argparse
import asyncio
import signal
import sys

from scaler.settings import ScalerSettings
from shared.logs import configure_logging
from shared.settings import Settings

# flag -> (ScalerSettings field, type)
SCALER_FLAGS = {
    "--backend": ("backend", str), "--min": ("min", int), "--max": ("max", int),
    "--target-per-worker": ("target_per_worker", int), "--activation-threshold": ("activation_threshold", int),
    "--poll-interval": ("poll_interval_seconds", float), "--stabilization": ("stabilization_seconds", float),
    "--idle": ("idle_seconds", float), "--grace": ("grace_seconds", float), "--metrics-port": ("metrics_port", int),
    "--metrics-host": ("metrics_host", str), "--state-dir": ("state_dir", str),
    "--worker-log-dir": ("worker_log_dir", str), "--deployment": ("deployment", str),
    "--namespace": ("namespace", str), "--kubeconfig": ("kubeconfig", str), "--kube-context": ("kube_context", str),
}
# flag -> Settings field (the workers' and Kafka's settings)
LLMQ_FLAGS = {"--kafka-bootstrap": "kafka_bootstrap", "--request-topic": "request_topic",
              "--consumer-group": "consumer_group", "--engine": "engine"}


def parse(argv: list[str] | None = None) -> tuple[Settings, ScalerSettings]:
    parser = argparse.ArgumentParser(prog="scaler", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag, (field, kind) in SCALER_FLAGS.items():
        env = f"LLMQ_SCALER_{field.upper()}"
        default = ScalerSettings.model_fields[field].default
        extra = {"choices": ["local", "kubernetes"]} if field == "backend" else {}
        parser.add_argument(flag, dest=f"scaler.{field}", type=kind, metavar=kind.__name__.upper(), help=f"{env} (default {default})", **extra)
    parser.add_argument("--dry-run", dest="scaler.dry_run", action="store_const", const=True,
                        help="LLMQ_SCALER_DRY_RUN: print each decision and why, start and stop nothing")
    for flag, field in LLMQ_FLAGS.items():
        parser.add_argument(flag, dest=f"llmq.{field}", metavar="STR", help=f"LLMQ_{field.upper()}")
    args = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    try:
        scaler_settings = ScalerSettings(**{k[7:]: v for k, v in args.items() if k.startswith("scaler.")})
        settings = Settings(**{k[5:]: v for k, v in args.items() if k.startswith("llmq.")})
    except ValueError as exc:
        parser.error(str(exc))
    return settings, scaler_settings


def make_backend(settings: Settings, scaler_settings: ScalerSettings):
    if scaler_settings.backend == "kubernetes":
        from scaler.backends.kubernetes import KubernetesBackend

        return KubernetesBackend.from_settings(scaler_settings)
    from scaler.backends.local import LocalBackend

    return LocalBackend(settings, scaler_settings)


async def serve(settings: Settings, scaler_settings: ScalerSettings) -> None:
    from scaler.daemon import Scaler

    echo = (lambda line: print(line, flush=True)) if scaler_settings.dry_run else None
    scaler = Scaler(settings, scaler_settings, make_backend(settings, scaler_settings), echo=echo)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, scaler.stop)
    await scaler.run()


def main(argv: list[str] | None = None) -> None:
    settings, scaler_settings = parse(argv)
    configure_logging(settings.log_level, settings.log_format)
    try:
        asyncio.run(serve(settings, scaler_settings))
    except KeyboardInterrupt:  # a second Ctrl-C during shutdown
        sys.exit(130)


if __name__ == "__main__":
    main()
