"""Stream, group and consumer names: built here and nowhere else.

Streams are per kind and per symbol (``gs:<kind>:<SYMBOL>``) so that per-symbol
order holds end to end and replicas can split symbols among themselves.
"""

from __future__ import annotations

import enum
from typing import Final

from gridstream.common.messages import Tags

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


#: The kind label of dead-letter streams (``gs:dlq:<group>``), for bounds and metrics.
DEAD_LETTER_KIND: Final = "dlq"
#: Default hard bound per stream kind (XADD MAXLEN ~); settings override them
#: (``GS_STREAM_MAXLEN_<KIND>``).
DEFAULT_BOUNDS: Final[dict[str, int]] = {
    Kind.TICKS.value: 200_000,
    Kind.CANDLES.value: 100_000,
    Kind.SIGNALS.value: 100_000,
    Kind.INTENTS.value: 100_000,
    Kind.ORDERS.value: 100_000,
    Kind.EXECUTIONS.value: 100_000,
    DEAD_LETTER_KIND: 100_000,
}

#: Largest encoded message (bytes) a producer adds and a consumer handles, by default.
DEFAULT_MAX_ENTRY_BYTES: Final = 1 << 20

#: The consumer groups that read each kind of stream, durably (they must have an entry
#: before it may be trimmed). Producers create these groups when they create a stream,
#: so an entry added before its consumer first starts is kept for it.
CONSUMERS: Final[dict[Kind, tuple[Service, ...]]] = {
    Kind.TICKS: (Service.ARCHIVER,),
    Kind.CANDLES: (Service.SIGNALS, Service.ARCHIVER),
    Kind.SIGNALS: (Service.STRATEGY,),
    Kind.INTENTS: (Service.RISK,),
    Kind.ORDERS: (Service.EXECUTOR, Service.STRATEGY),
    Kind.EXECUTIONS: (Service.STRATEGY, Service.RISK, Service.ARCHIVER),
}

#: The service that writes each kind of stream (and trims it, once every group has it).
PRODUCERS: Final[dict[Service, tuple[Kind, ...]]] = {
    Service.INGESTOR: (Kind.TICKS, Kind.CANDLES),
    Service.SIGNALS: (Kind.SIGNALS,),
    Service.STRATEGY: (Kind.INTENTS,),
    Service.RISK: (Kind.ORDERS,),
    Service.EXECUTOR: (Kind.EXECUTIONS,),
}

#: The message tags each kind of stream carries; anything else on it is a dead letter.
ACCEPTS: Final[dict[Kind, frozenset[str]]] = {
    Kind.TICKS: frozenset({Tags.TICK}),
    Kind.CANDLES: frozenset({Tags.CANDLE}),
    Kind.SIGNALS: frozenset({Tags.SIGNAL}),
    Kind.INTENTS: frozenset({Tags.ORDER_INTENT}),
    Kind.ORDERS: frozenset({Tags.ORDER_APPROVED, Tags.ORDER_REJECTED}),
    Kind.EXECUTIONS: frozenset(
        {Tags.ORDER_ACCEPTED, Tags.ORDER_CANCELED, Tags.ORDER_FILLED, Tags.ORDER_FAILED}
    ),
}


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


def kind_of(name: str) -> str | None:
    """The kind of a gridstream stream (a :class:`Kind` value or ``dlq``), else None."""
    parts = name.split(":", 2)
    if len(parts) < 3 or parts[0] != PREFIX:
        return None
    if parts[1] == DEAD_LETTER_KIND:
        return DEAD_LETTER_KIND
    try:
        return Kind(parts[1]).value
    except ValueError:
        return None


def symbol_of(name: str) -> str | None:
    """The symbol of a per-symbol stream (``gs:candles:BTCUSDT`` -> ``BTCUSDT``), else None."""
    kind = kind_of(name)
    if kind is None or kind == DEAD_LETTER_KIND:
        return None
    return name.split(":", 2)[2]


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


def supervisor_key() -> str:
    """Hash ``gridstream run`` keeps of its children (field: service, value: JSON state)."""
    return f"{PREFIX}:supervisor"


#: The lease name of a service's single active role (risk, the executor).
ACTIVE_LEASE: Final = "_active"


def replica_key(service: Service | str, replica: str) -> str:
    """The key a live replica holds to own its id (``gs:replica:<service>:<id>``)."""
    return f"{PREFIX}:replica:{service}:{replica}"


def replicas_key(service: Service | str) -> str:
    """The sorted set of a service's live replica ids (score: expiry, ms)."""
    return f"{PREFIX}:replicas:{service}"


def lease_key(service: Service | str, name: str) -> str:
    """A lease of a service: a symbol (``BTCUSDT``) or :data:`ACTIVE_LEASE`."""
    return f"{PREFIX}:lease:{service}:{name}"


def fence_key(service: Service | str) -> str:
    """The fencing-token counter of a service's active role."""
    return f"{PREFIX}:fence:{service}"
