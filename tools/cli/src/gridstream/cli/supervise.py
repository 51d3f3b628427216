"""How ``gridstream run`` restarts a child that dies, and what it shows about it.

Pure policy, no I/O: the capped, jittered exponential backoff, when a child counts as
stable again, what is a crash loop, and the record of each child that ``run`` keeps in
Redis (:func:`gridstream.common.streams.supervisor_key`) for ``gridstream status``.
"""

from __future__ import annotations

import enum
import random
import signal
from dataclasses import dataclass

import msgspec

#: Consecutive quick deaths (each within ``stable_s`` of its start) that make a crash loop.
CRASH_LOOP_DEATHS = 3
#: Largest exponent used, so that ``factor ** n`` never overflows (the cap wins long before).
_MAX_EXPONENT = 64


@dataclass(frozen=True)
class BackoffPolicy:
    """Delay before restart ``n`` of a streak: ``min(cap, initial * factor**n)``, minus a
    random part of at most ``jitter`` of it (so restarts of several children spread out
    and the delay never exceeds the cap). A child that stayed up ``stable_s`` starts a
    new streak: its next delay is ``initial`` again."""

    initial_s: float = 0.5
    factor: float = 2.0
    cap_s: float = 30.0
    jitter: float = 0.3
    stable_s: float = 30.0

    def __post_init__(self) -> None:
        if self.initial_s <= 0 or self.cap_s < self.initial_s:
            raise ValueError("backoff needs 0 < initial_s <= cap_s")
        if self.factor < 1:
            raise ValueError("backoff factor must be >= 1")
        if not 0 <= self.jitter < 1:
            raise ValueError("backoff jitter must be in [0, 1)")
        if self.stable_s <= 0:
            raise ValueError("stable_s must be > 0")

    def base_s(self, n: int) -> float:
        """The un-jittered delay of the ``n``-th restart of a streak (``n`` from 0)."""
        return min(self.cap_s, self.initial_s * self.factor ** min(n, _MAX_EXPONENT))


class Backoff:
    """One child's streak of quick deaths and the delay before its next start."""

    def __init__(self, policy: BackoffPolicy, rng: random.Random | None = None) -> None:
        self.policy = policy
        self.rng = rng or random.Random()
        #: Deaths in a row, each before the child was up ``stable_s``.
        self.streak = 0

    def stable(self) -> bool:
        """The child stayed up long enough: the streak ends. True if there was one."""
        had = self.streak > 0
        self.streak = 0
        return had

    def next_delay(self, uptime_s: float) -> float:
        """The child died (or could not start) after ``uptime_s``: seconds to wait."""
        if uptime_s >= self.policy.stable_s:
            self.streak = 0
        base = self.policy.base_s(self.streak)
        self.streak += 1
        return base * (1.0 - self.policy.jitter * self.rng.random())

    @property
    def crash_loop(self) -> bool:
        return self.streak >= CRASH_LOOP_DEATHS


class Phase(enum.StrEnum):
    """Where a supervised child is."""

    STARTING = "starting"  # spawned, its health endpoint has not answered with its pid yet
    UP = "up"  # its health endpoint answered with its pid
    BACKOFF = "backoff"  # dead, waiting to be started again
    FAILED = "failed"  # dead and not restarted (invalid configuration, --exit-on-failure)
    STOPPED = "stopped"  # stopped by the supervisor


class ChildState(msgspec.Struct, kw_only=True):
    """What ``run`` publishes about one child (JSON in the supervisor hash)."""

    service: str
    phase: Phase = Phase.STARTING
    pid: int | None = None
    #: Times the supervisor started it again after it died.
    restarts: int = 0
    last_exit_code: int | None = None
    last_exit_ns: int | None = None
    started_ns: int | None = None
    #: When the next start is due (while in :attr:`Phase.BACKOFF`).
    next_start_ns: int | None = None
    backoff_s: float = 0.0
    #: Quick deaths in a row and when the first of them happened.
    streak: int = 0
    streak_since_ns: int | None = None
    crash_loop: bool = False
    #: Why it is down, in words (exit status, port taken, another process answering).
    reason: str = ""
    supervisor_pid: int = 0
    #: When the supervisor last wrote this record (ns); older than the heartbeat TTL: stale.
    ts: int = 0


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(ChildState)


def encode_state(state: ChildState) -> bytes:
    return _encoder.encode(state)


def decode_state(raw: bytes | str) -> ChildState:
    return _decoder.decode(raw)


def crash_loop_text(state: ChildState, now_ns: int) -> str:
    """``crash loop: 4 restarts in the last 13 s`` while it is one, else ``""``."""
    if not state.crash_loop or state.streak_since_ns is None:
        return ""
    seconds = max(0, round((now_ns - state.streak_since_ns) / 1e9))
    return f"crash loop: {state.streak} restarts in the last {seconds} s"


def describe_exit(code: int | None) -> str:
    """``exit code 3`` or ``killed by SIGKILL``."""
    if code is None:
        return "running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"
