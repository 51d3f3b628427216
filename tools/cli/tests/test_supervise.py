"""The restart policy of ``gridstream run``: capped, jittered, reset once stable."""

from __future__ import annotations

import random

import pytest

from gridstream.cli.supervise import (
    CRASH_LOOP_DEATHS,
    Backoff,
    BackoffPolicy,
    ChildState,
    Phase,
    crash_loop_text,
    decode_state,
    describe_exit,
    encode_state,
)


def test_delays_grow_exponentially_up_to_the_cap_without_jitter():
    b = Backoff(BackoffPolicy(initial_s=0.5, factor=2, cap_s=5, jitter=0, stable_s=30))
    delays = [b.next_delay(uptime_s=1) for _ in range(7)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0]


def test_jitter_only_shortens_and_stays_within_its_share():
    policy = BackoffPolicy(initial_s=1, factor=2, cap_s=8, jitter=0.3, stable_s=30)
    b = Backoff(policy, random.Random(7))
    seen = []
    for n in range(200):
        d = b.next_delay(uptime_s=0)
        base = policy.base_s(n)
        assert base * 0.7 <= d <= base
        seen.append(d / base)
    assert max(seen) - min(seen) > 0.2  # really jittered, not a constant factor
    assert max(seen) <= 1.0


def test_a_stable_child_starts_a_new_streak():
    b = Backoff(BackoffPolicy(initial_s=1, factor=3, cap_s=100, jitter=0, stable_s=10))
    assert [b.next_delay(2) for _ in range(3)] == [1, 3, 9]
    assert b.crash_loop == (CRASH_LOOP_DEATHS <= 3)
    # it then ran 12 s before dying: that death starts a new streak
    assert b.next_delay(12) == 1
    assert b.streak == 1 and not b.crash_loop
    # or the supervisor saw it stable while still running
    b.next_delay(0)
    assert b.stable() is True and b.streak == 0 and b.stable() is False


def test_crash_loop_after_quick_deaths_in_a_row():
    b = Backoff(BackoffPolicy(jitter=0))
    flags = []
    for _ in range(CRASH_LOOP_DEATHS + 1):
        b.next_delay(0.1)
        flags.append(b.crash_loop)
    assert flags == [False] * (CRASH_LOOP_DEATHS - 1) + [True, True]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"initial_s": 0},
        {"initial_s": 5, "cap_s": 1},
        {"factor": 0.5},
        {"jitter": 1.0},
        {"jitter": -0.1},
        {"stable_s": 0},
    ],
)
def test_bad_policies_are_refused(kwargs):
    with pytest.raises(ValueError, match=r"backoff|stable_s"):
        BackoffPolicy(**kwargs)


def test_state_round_trips_and_describes_itself():
    st = ChildState(
        service="executor",
        phase=Phase.BACKOFF,
        restarts=4,
        streak=4,
        streak_since_ns=1_000_000_000,
        crash_loop=True,
        last_exit_code=-9,
    )
    back = decode_state(encode_state(st))
    assert back == st
    assert crash_loop_text(back, 14_000_000_000) == "crash loop: 4 restarts in the last 13 s"
    assert crash_loop_text(ChildState(service="x"), 0) == ""
    assert describe_exit(-9) == "killed by SIGKILL"
    assert describe_exit(3) == "exit code 3"
    assert describe_exit(None) == "running"
