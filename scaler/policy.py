"""The scaling policy: from queue depth readings to a number of workers.

Pure: time is passed in, nothing is read or changed outside the object, so
unit tests drive it with sequences of readings.

  1) target = ceil(depth / target_per_worker), clamped to [min, cap], where
     cap = min(max, partitions): a worker beyond the partition count idles.
     Lanes weigh apart: the interactive lane's depth as above; the bulk lane's
     the same way but never for more than bulk_max_workers (RunPod's
     `lowPriority`: bulk work alone gets a few workers, not the fleet); the
     target is the larger of the two. bulk_max_workers=0: bulk alone wakes and
     keeps no worker; it runs on those interactive load (or min) keeps.
  2) 0 -> 1 as soon as a lane that may ask for a worker has depth over the
     activation threshold.
  3) Up: immediate, at most doubling per decision.
  4) Down: only when every target of the last stabilization window was under
     the current count (HPA's scale-down stabilization: the window's highest
     target is the recommendation), one worker per decision. Noise that keeps
     touching the current count keeps it, so a steady noisy load never flaps.
  5) The last worker goes (min 0) only after the queue has been idle
     (no lane asks for a worker) for idle_seconds; until then the
     floor for scaling down is one worker.
Readings made before the policy has watched a whole window never scale
down, so a restarted scaler keeps the workers it finds.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class PolicyConfig:
    min: int = 0
    max: int = 4
    target_per_worker: int = 10
    activation_threshold: int = 0
    stabilization_seconds: float = 60.0
    idle_seconds: float = 300.0
    bulk_max_workers: int = 1

    @classmethod
    def from_settings(cls, s) -> PolicyConfig:
        return cls(min=s.min, max=s.max, target_per_worker=s.target_per_worker,
                   activation_threshold=s.activation_threshold,
                   stabilization_seconds=s.stabilization_seconds, idle_seconds=s.idle_seconds,
                   bulk_max_workers=s.bulk_max_workers)


@dataclass(frozen=True)
class Decision:
    depth: int
    current: int
    desired: int
    reason: str
    target: int  # what the depths alone ask for, clamped
    partitions: int
    bulk_depth: int = 0  # the bulk lane's (`depth` is the interactive lane's)

    @property
    def changes(self) -> bool:
        return self.desired != self.current


class ScalingPolicy:
    def __init__(self, config: PolicyConfig) -> None:
        self.config = config
        self._targets: deque[tuple[float, int]] = deque()  # (time, target) over the window
        self._watching_since: float | None = None
        self._idle_since: float | None = None

    def decide(self, now: float, depth: int, current: int, partitions: int, bulk_depth: int = 0) -> Decision:
        c = self.config
        # 1) bounds: no more workers than partitions (unknown partition count: 0, no topic yet)
        cap = min(c.max, partitions) if partitions > 0 else c.max
        floor = min(c.min, cap)
        wanted = max(self._wanted(depth), min(self._wanted(bulk_depth), c.bulk_max_workers))
        idle = wanted == 0
        if not idle:
            self._idle_since = None
        elif self._idle_since is None:
            self._idle_since = now
        # While not idle long enough, the floor for scaling down is one worker.
        idle_long_enough = idle and now - self._idle_since >= c.idle_seconds
        keep = floor if idle_long_enough else max(floor, 1 if not idle or current > 0 else 0)
        target = max(min(wanted, cap), keep)
        self._remember(now, target)

        def decision(desired: int, reason: str) -> Decision:
            return Decision(depth, current, desired, reason, target, partitions, bulk_depth)

        # 2) hard bounds first: below min, above max or the partition count
        if current < floor:
            return decision(floor, "below_min")
        if current > cap:
            return decision(cap, "above_max" if cap == c.max else "above_partitions")
        # 3) activation and scale-up: immediate, at most doubling
        if current == 0 and not idle:
            return decision(1, "activation")
        if target > current:
            return decision(min(target, 2 * current), "scale_up")
        # 4) the last worker goes once the queue has been idle long enough
        if target == 0 and current == 1:
            return decision(0, "idle")
        # 5) scale-down: the whole window must have wanted fewer workers
        if target < current:
            watched = now - self._watching_since >= c.stabilization_seconds
            recommended = max(t for _, t in self._targets)
            if not watched or recommended >= current:
                return decision(current, "stabilizing")
            return decision(current - 1, "scale_down")
        if idle and current > 0 and floor == 0:
            return decision(current, "idle_waiting")
        return decision(current, "steady")

    def _wanted(self, depth: int) -> int:
        """Workers one lane's depth asks for: none at or under the activation threshold."""
        c = self.config
        return math.ceil(depth / c.target_per_worker) if depth > c.activation_threshold else 0

    def _remember(self, now: float, target: int) -> None:
        if self._watching_since is None:
            self._watching_since = now
        self._targets.append((now, target))
        horizon = now - self.config.stabilization_seconds
        while len(self._targets) > 1 and self._targets[0][0] < horizon:
            self._targets.popleft()
