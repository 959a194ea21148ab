"""What a scaler scales: the request workers (the default) or the trainers of
fine-tuning jobs. Each pool is its own consumer group on its own topics, so a
deployment runs one scaler per pool (`scaler --pool trainers` beside the usual one)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Literal

from shared.settings import ServiceSettings

PoolName = Literal["workers", "trainers"]
GROUP_FIELD = {"workers": "consumer_group", "trainers": "trainer_group"}


@dataclass(frozen=True)
class Pool:
    name: PoolName
    group: str  # the consumer group whose lag is read
    group_variable: str  # the environment variable that names it in the pool's processes
    topics: tuple[str, ...]  # interactive lane first; a second topic is the bulk lane
    module: str  # what a local backend starts: `python -m <module>`
    script: str  # the same as a console script (`llmq` installs both)

    @classmethod
    def of(cls, name: PoolName, settings: ServiceSettings) -> Pool:
        if name == "trainers":
            return cls("trainers", settings.trainer_group, "LLMQ_TRAINER_GROUP", (settings.fine_tuning_topic,),
                       "workers.training.main", "trainer")
        return cls("workers", settings.consumer_group, "LLMQ_CONSUMER_GROUP", tuple(settings.lane_topics),
                   "workers.main", "worker")

    @property
    def command(self) -> list[str]:
        return [sys.executable, "-m", self.module]

    def depths(self, reading) -> tuple[int, int]:
        """(interactive, bulk) depth of a LagReading of this pool's topics."""
        interactive = reading.of(self.topics[0]).depth
        bulk = reading.of(self.topics[1]).depth if len(self.topics) > 1 else 0
        return interactive, bulk

    def is_member(self, args: list[str], environ: dict[str, str], group: str | None) -> bool:
        """A process's command line and environment are one of this pool's (of `group`, when given)."""
        if not (self.module in args or any(a.rsplit("/", 1)[-1] == self.script for a in args[:2])):
            return False
        default = ServiceSettings.model_fields[GROUP_FIELD[self.name]].default
        return group is None or environ.get(self.group_variable, default) == group

    def lag_settings(self, settings: ServiceSettings) -> ServiceSettings:
        """The settings a LagReader of this pool reads with (its group in place of the workers')."""
        return settings.model_copy(update={"consumer_group": self.group})


WORKERS = Pool.of("workers", ServiceSettings())
