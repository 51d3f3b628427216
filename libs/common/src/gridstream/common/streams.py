"""Stream, group and consumer names: built here and nowhere else.

Streams are per kind and per symbol (``gs:<kind>:<SYMBOL>``) so that per-symbol
order holds end to end and replicas can split symbols among themselves.
"""

from __future__ import annotations

import enum
from typing import Final

PREFIX: Final = "gs"


class Kind(enum.StrEnum):
    """The stream families, in pipeline order."""

    TICKS = "ticks"
    CANDLES = "candles"
    SIGNALS = "signals"
    INTENTS = "intents"
    ORDERS = "orders"  # risk's verdicts: OrderApproved / OrderRejected
    EXECUTIONS = "executions"  # executor's venue events: accepted, canceled, filled, failed


class Service(enum.StrEnum):
    """Service names; each consuming service's consumer group is named after it."""

    SIMULATOR = "simulator"
    INGESTOR = "ingestor"
    SIGNALS = "signals"
    STRATEGY = "strategy"
    RISK = "risk"
    EXECUTOR = "executor"
    ARCHIVER = "archiver"


#: Default upper bound on each stream's length (XADD MAXLEN ~).
DEFAULT_MAXLEN: Final = 100_000
DEAD_LETTER_MAXLEN: Final = 100_000


def stream(kind: Kind, symbol: str) -> str:
    """The stream of one kind for one symbol, e.g. ``gs:candles:BTCUSDT``."""
    return f"{PREFIX}:{kind.value}:{symbol.upper()}"


def streams(kind: Kind, symbols: list[str] | tuple[str, ...]) -> list[str]:
    """The streams of one kind for several symbols."""
    return [stream(kind, s) for s in symbols]


def parse(name: str) -> tuple[Kind, str]:
    """Inverse of :func:`stream`: ``gs:candles:BTCUSDT`` -> (Kind.CANDLES, "BTCUSDT")."""
    prefix, kind, symbol = name.split(":", 2)
    if prefix != PREFIX:
        raise ValueError(f"not a gridstream stream: {name!r}")
    return Kind(kind), symbol


def dead_letters(group: Service | str) -> str:
    """The dead-letter stream of one consumer group."""
    return f"{PREFIX}:dlq:{group}"


def group(service: Service) -> str:
    """The consumer group of a consuming service."""
    return service.value


def consumer(service: Service, replica: str) -> str:
    """A consumer name stable per replica, so a restart finds its own pending entries."""
    return f"{service.value}-{replica}"


def pattern_all() -> str:
    """SCAN pattern matching every gridstream stream."""
    return f"{PREFIX}:*"


def heartbeat_key(service: Service | str, replica: str) -> str:
    """Redis key each service refreshes with its health (read by ``gridstream status``)."""
    return f"{PREFIX}:health:{service}:{replica}"
