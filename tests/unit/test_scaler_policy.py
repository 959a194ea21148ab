"""The scaling policy over sequences of depth readings (time passed in, no services)."""

from __future__ import annotations

import random

from scaler.policy import PolicyConfig, ScalingPolicy


def run(policy: ScalingPolicy, readings, current: int = 0, partitions: int = 8, start: float = 0.0, step: float = 1.0):
    """Feed (depth) readings one poll apart, applying each decision; returns the decisions."""
    decisions = []
    now = start
    for depth in readings:
        decision = policy.decide(now, depth, current, partitions)
        decisions.append(decision)
        current = decision.desired
        now += step
    return decisions


def test_zero_to_one_on_the_first_reading_above_the_activation_threshold():
    policy = ScalingPolicy(PolicyConfig(min=0, max=4, activation_threshold=0))
    first = policy.decide(0.0, 1, 0, 8)
    assert (first.desired, first.reason) == (1, "activation")

    quiet = ScalingPolicy(PolicyConfig(min=0, max=4, activation_threshold=5))
    decisions = run(quiet, [3, 5, 5, 6])
    assert [d.desired for d in decisions] == [0, 0, 0, 1]


def test_scale_up_is_immediate_but_at_most_doubles_per_step():
    policy = ScalingPolicy(PolicyConfig(min=0, max=16, target_per_worker=10))
    decisions = run(policy, [500] * 6, partitions=16)
    assert [d.desired for d in decisions] == [1, 2, 4, 8, 16, 16]
    assert [d.reason for d in decisions[:5]] == ["activation"] + ["scale_up"] * 4


def test_desired_is_ceil_of_depth_over_target():
    policy = ScalingPolicy(PolicyConfig(min=0, max=8, target_per_worker=10))
    assert policy.decide(0.0, 31, 2, 8).desired == 4  # ceil(31/10) = 4, within doubling of 2
    assert policy.decide(1.0, 31, 4, 8).reason == "steady"


def test_clamped_to_max_and_to_the_partition_count():
    by_max = ScalingPolicy(PolicyConfig(min=0, max=3, target_per_worker=1))
    assert [d.desired for d in run(by_max, [1000] * 5, partitions=8)] == [1, 2, 3, 3, 3]

    by_partitions = ScalingPolicy(PolicyConfig(min=0, max=10, target_per_worker=1))
    assert [d.desired for d in run(by_partitions, [1000] * 5, partitions=2)] == [1, 2, 2, 2, 2]

    # more workers than partitions (topic recreated smaller, max lowered): down at once
    decision = ScalingPolicy(PolicyConfig(min=0, max=10)).decide(0.0, 5, 6, 4)
    assert (decision.desired, decision.reason) == (4, "above_partitions")
    # min above the partition count is clamped too
    assert ScalingPolicy(PolicyConfig(min=6, max=10)).decide(0.0, 0, 0, 4).desired == 4


def test_min_is_kept_when_idle_and_restored_at_once():
    policy = ScalingPolicy(PolicyConfig(min=2, max=4, stabilization_seconds=5, idle_seconds=5))
    decisions = run(policy, [0] * 30, current=0)
    assert decisions[0].desired == 2 and decisions[0].reason == "below_min"
    assert {d.desired for d in decisions[1:]} == {2}


def test_scale_down_waits_for_the_stabilization_window_then_one_step_at_a_time():
    policy = ScalingPolicy(PolicyConfig(min=1, max=8, target_per_worker=10, stabilization_seconds=10,
                                        idle_seconds=1000))
    # a burst that needs 4 workers, then a light load that needs 1
    decisions = run(policy, [40] * 5 + [5] * 20)
    desired = [d.desired for d in decisions]
    assert max(desired) == 4
    first_down = next(i for i, d in enumerate(decisions) if d.reason == "scale_down")
    # the last reading asking for 4 was at t=4: no scale-down until the window after it has passed
    assert first_down >= 4 + 10
    assert all(d.reason == "stabilizing" for d in decisions[5:first_down])
    # one worker per step, down to what the load needs (1), never below min
    steps = [b - a for a, b in zip(desired, desired[1:]) if b != a]
    assert [s for s in steps if s < 0] == [-1, -1, -1]
    assert desired[-1] == 1


def test_no_flapping_on_a_noisy_steady_load():
    rng = random.Random(7)
    policy = ScalingPolicy(PolicyConfig(min=0, max=8, target_per_worker=10, stabilization_seconds=60,
                                        idle_seconds=300))
    # 25..45 queued, at random: ceil(depth/10) jumps between 3 and 5 from one poll to the next
    readings = [rng.randint(25, 45) for _ in range(600)]
    decisions = run(policy, readings)
    changes = [(i, d.current, d.desired) for i, d in enumerate(decisions) if d.changes]
    downs = [c for c in changes if c[2] < c[1]]
    # up to the noise's high-water mark within the first minute, then no down-and-up again
    assert all(i < 60 for i, _, _ in changes), changes
    assert len(downs) == 0, changes
    assert decisions[-1].desired == 5


def test_scale_to_zero_only_after_the_idle_period():
    policy = ScalingPolicy(PolicyConfig(min=0, max=4, target_per_worker=10, stabilization_seconds=10,
                                        idle_seconds=30))
    decisions = run(policy, [25] * 3 + [0] * 60)
    desired = [d.desired for d in decisions]
    assert max(desired) == 3
    zero_at = desired.index(0, 3)
    # idle from t=3; the last worker leaves once it has been idle 30 s, not before
    assert zero_at == 3 + 30
    assert decisions[zero_at].reason == "idle"
    assert all(d >= 1 for d in desired[1:zero_at])
    # and while idle it stays at zero
    assert set(desired[zero_at:]) == {0}


def test_a_blip_during_the_idle_period_restarts_it():
    policy = ScalingPolicy(PolicyConfig(min=0, max=4, stabilization_seconds=5, idle_seconds=10))
    decisions = run(policy, [1] + [0] * 8 + [1] + [0] * 9 + [0] * 3)
    desired = [d.desired for d in decisions]
    assert desired.index(0, 1) == 9 + 1 + 10  # idle again from t=10, ten more seconds


def test_a_restarted_policy_does_not_scale_down_before_watching_a_whole_window():
    # a fresh scaler finds 4 workers and a short queue: it keeps them for a window first
    policy = ScalingPolicy(PolicyConfig(min=0, max=8, stabilization_seconds=20, idle_seconds=1000))
    decisions = run(policy, [5] * 40, current=4)
    desired = [d.desired for d in decisions]
    assert desired[:20] == [4] * 20
    assert desired[-1] == 1


def test_unknown_partition_count_does_not_block_min():
    # the topic does not exist yet (the first worker creates it): no partitions in metadata
    decision = ScalingPolicy(PolicyConfig(min=1, max=4)).decide(0.0, 0, 0, 0)
    assert (decision.desired, decision.reason) == (1, "below_min")


# ---- lanes: interactive lag scales as above, bulk lag alone only up to bulk_max_workers --------

def run_lanes(policy: ScalingPolicy, readings, current: int = 0, partitions: int = 8):
    """Like run(), with (interactive depth, bulk depth) readings."""
    decisions = []
    for now, (depth, bulk) in enumerate(readings):
        decision = policy.decide(float(now), depth, current, partitions, bulk_depth=bulk)
        decisions.append(decision)
        current = decision.desired
    return decisions


def test_bulk_lag_alone_wakes_one_worker_from_zero_and_no_more():
    policy = ScalingPolicy(PolicyConfig(min=0, max=8, target_per_worker=10, bulk_max_workers=1))
    decisions = run_lanes(policy, [(0, 5000)] * 5)
    assert [d.desired for d in decisions] == [1, 1, 1, 1, 1]
    assert decisions[0].reason == "activation" and decisions[0].bulk_depth == 5000 and decisions[0].depth == 0


def test_bulk_max_workers_caps_bulk_but_interactive_lag_scales_as_before():
    policy = ScalingPolicy(PolicyConfig(min=0, max=8, target_per_worker=10, bulk_max_workers=2))
    assert [d.desired for d in run_lanes(policy, [(0, 5000)] * 4)] == [1, 2, 2, 2]
    # interactive lag on top: the larger of the two asks (6 for 60 interactive), not their sum
    both = ScalingPolicy(PolicyConfig(min=0, max=8, target_per_worker=10, bulk_max_workers=2))
    assert [d.desired for d in run_lanes(both, [(60, 5000)] * 5)] == [1, 2, 4, 6, 6]
    # bulk lag does not add to interactive lag: 60 interactive + 5000 bulk asks what 60 alone asks
    alone = ScalingPolicy(PolicyConfig(min=0, max=8, target_per_worker=10, bulk_max_workers=2))
    assert [d.desired for d in run_lanes(alone, [(60, 0)] * 5)] == [1, 2, 4, 6, 6]


def test_bulk_max_workers_zero_means_bulk_alone_wakes_and_keeps_no_worker():
    policy = ScalingPolicy(PolicyConfig(min=0, max=8, bulk_max_workers=0, idle_seconds=2))
    assert [d.desired for d in run_lanes(policy, [(0, 5000)] * 3)] == [0, 0, 0]
    # woken by interactive work, the worker goes once interactive has been idle, bulk left or not
    decisions = run_lanes(policy, [(5, 5000)] + [(0, 5000)] * 4)
    assert [d.desired for d in decisions] == [1, 1, 1, 0, 0]


def test_bulk_lag_keeps_its_worker_from_idling_away():
    policy = ScalingPolicy(PolicyConfig(min=0, max=8, bulk_max_workers=1, idle_seconds=2))
    decisions = run_lanes(policy, [(50, 0)] + [(0, 300)] * 10)
    assert decisions[-1].desired == 1  # bulk still queued: one worker stays
    assert all(d.reason != "idle" for d in decisions)


def test_bulk_respects_min_max_and_partitions():
    policy = ScalingPolicy(PolicyConfig(min=0, max=2, bulk_max_workers=5))
    assert [d.desired for d in run_lanes(policy, [(0, 5000)] * 4)] == [1, 2, 2, 2]
    few = ScalingPolicy(PolicyConfig(min=0, max=8, bulk_max_workers=5))
    assert [d.desired for d in run_lanes(few, [(0, 5000)] * 4, partitions=3)] == [1, 2, 3, 3]
    kept = ScalingPolicy(PolicyConfig(min=3, max=8, bulk_max_workers=1))
    assert run_lanes(kept, [(0, 5000)], current=3)[0].desired == 3


def test_bulk_lag_at_or_under_the_activation_threshold_is_idle():
    policy = ScalingPolicy(PolicyConfig(min=0, max=8, activation_threshold=5, bulk_max_workers=1))
    assert [d.desired for d in run_lanes(policy, [(0, 5), (0, 6)])] == [0, 1]
