"""Every message kind that travels on the bus, as one tagged union.

Rules (see docs/architecture.md):

* Structs are frozen: a message, once made, is never mutated.
* Each kind has an explicit, stable tag in the ``kind`` field. Tags never change.
* Every message carries ``id`` (unique), ``ts_event`` and ``ts_init`` (integer ns
  since the epoch, UTC) and the schema version ``v`` it was written with.
* Schema evolution: new fields get defaults and types never change, so an older
  reader decodes a newer message (unknown fields are ignored).
* Prices, quantities, fees and balances are :class:`~decimal.Decimal`; msgpack
  carries them as strings, so no precision is lost.
"""

from __future__ import annotations

import os
import time
from decimal import Decimal
from typing import Final, Literal, TypeAlias

import msgspec

SCHEMA_VERSION: Final = 1

Side: TypeAlias = Literal["BUY", "SELL"]
IntentAction: TypeAlias = Literal["place", "cancel"]
Liquidity: TypeAlias = Literal["maker", "taker"]
#: A limit order rests at its price; a market order takes the book at once.
OrderType: TypeAlias = Literal["LIMIT", "MARKET"]
Regime: TypeAlias = Literal["warmup", "range", "trend_up", "trend_down", "high_volatility"]


class OrderTypes:
    """The :data:`OrderType` values by name."""

    LIMIT: Final = "LIMIT"
    MARKET: Final = "MARKET"


class Actions:
    """The :data:`IntentAction` values by name; code and SQL (``{{IntentAction.PLACE}}``)
    use these, never the strings; a test holds them equal to the type.
    """

    PLACE: Final = "place"
    CANCEL: Final = "cancel"


class Tags:
    """The stable wire tags, defined once."""

    TICK: Final = "tick"
    CANDLE: Final = "candle"
    SIGNAL: Final = "signal"
    ORDER_INTENT: Final = "order_intent"
    ORDER_APPROVED: Final = "order_approved"
    ORDER_REJECTED: Final = "order_rejected"
    ORDER_ACCEPTED: Final = "order_accepted"
    ORDER_CANCELED: Final = "order_canceled"
    ORDER_FILLED: Final = "order_filled"
    ORDER_FAILED: Final = "order_failed"


_counter = 0
_pid = os.getpid()


def new_id() -> str:
    """A unique, roughly time-ordered id: ns timestamp, pid and a counter (hex)."""
    global _counter, _pid
    _counter += 1
    if _counter == 1:
        _pid = os.getpid()
    return f"{time.time_ns():x}-{_pid:x}-{_counter:x}"


def deterministic_id(*parts: object) -> str:
    """An id derived from content, so a replayed input gives the same output id."""
    return ":".join(map(str, parts))


class Message(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind"):
    """Fields common to every message."""

    id: str
    ts_event: int
    ts_init: int
    v: int = SCHEMA_VERSION


class Tick(Message, frozen=True, kw_only=True, tag=Tags.TICK):
    """One public trade. ``side`` is the aggressor (taker) side."""

    symbol: str
    trade_id: int
    price: Decimal
    qty: Decimal
    side: Side


class Candle(Message, frozen=True, kw_only=True, tag=Tags.CANDLE):
    """A closed candle. ``open_time``/``close_time`` are exchange ms, as Binance gives them."""

    symbol: str
    interval: str
    open_time: int
    close_time: int
    open: Decimal
    high: Decimal
    low: Decimal
    close: Decimal
    volume: Decimal
    quote_volume: Decimal = Decimal(0)
    trades: int = 0
    source: str = "ws"


class Signal(Message, frozen=True, kw_only=True, tag=Tags.SIGNAL):
    """Indicator values for one closed candle (floats: indicator math)."""

    symbol: str
    interval: str
    open_time: int
    close: Decimal
    ema: float
    atr: float
    volatility: float
    trend: float
    regime: Regime = "range"
    #: Every indicator behind the signal and its regime, by name (e.g. ``adx``, ``rsi``,
    #: ``bb_width_z``); see services/signals/README.md. Empty from older writers.
    values: dict[str, float] = msgspec.field(default_factory=dict)


class OrderIntent(Message, frozen=True, kw_only=True, tag=Tags.ORDER_INTENT):
    """What the strategy wants: place or cancel one order at a grid level."""

    action: IntentAction
    symbol: str
    client_order_id: str
    side: Side
    price: Decimal
    qty: Decimal
    level: int = 0
    strategy: str = "grid"
    reason: str = ""
    #: ``MARKET``: fill at once at the market (``price`` is then only the reference price
    #: the strategy saw); ``LIMIT``: rest at ``price``.
    order_type: OrderType = "LIMIT"


class OrderApproved(Message, frozen=True, kw_only=True, tag=Tags.ORDER_APPROVED):
    """Risk approved the intent; only approved orders ever reach a venue."""

    intent_id: str
    action: IntentAction
    symbol: str
    client_order_id: str
    side: Side
    price: Decimal
    qty: Decimal


class OrderRejected(Message, frozen=True, kw_only=True, tag=Tags.ORDER_REJECTED):
    """Risk refused the intent; ``reason`` is a stable code, ``detail`` for humans."""

    intent_id: str
    action: IntentAction
    symbol: str
    client_order_id: str
    reason: str
    detail: str = ""


class OrderAccepted(Message, frozen=True, kw_only=True, tag=Tags.ORDER_ACCEPTED):
    """The venue acknowledged the order and it rests on the book."""

    symbol: str
    client_order_id: str
    venue_order_id: str
    side: Side
    price: Decimal
    qty: Decimal


class OrderCanceled(Message, frozen=True, kw_only=True, tag=Tags.ORDER_CANCELED):
    """The venue canceled the order (on request or by itself)."""

    symbol: str
    client_order_id: str
    venue_order_id: str
    filled_qty: Decimal = Decimal(0)


class OrderFilled(Message, frozen=True, kw_only=True, tag=Tags.ORDER_FILLED):
    """One execution against the order; unique per (venue, symbol, trade_id)."""

    symbol: str
    client_order_id: str
    venue_order_id: str
    trade_id: str
    side: Side
    price: Decimal
    qty: Decimal
    fee: Decimal
    fee_asset: str
    liquidity: Liquidity
    venue: str = ""


class OrderFailed(Message, frozen=True, kw_only=True, tag=Tags.ORDER_FAILED):
    """The venue refused the request; ``code`` is the venue error code."""

    symbol: str
    client_order_id: str
    action: IntentAction
    code: int
    reason: str


AnyMessage: TypeAlias = (
    Tick
    | Candle
    | Signal
    | OrderIntent
    | OrderApproved
    | OrderRejected
    | OrderAccepted
    | OrderCanceled
    | OrderFilled
    | OrderFailed
)

ALL_KINDS: Final[tuple[type[Message], ...]] = (
    Tick,
    Candle,
    Signal,
    OrderIntent,
    OrderApproved,
    OrderRejected,
    OrderAccepted,
    OrderCanceled,
    OrderFilled,
    OrderFailed,
)
