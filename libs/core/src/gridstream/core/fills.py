"""Pure fill decisions shared by the simulator, paper trading and the backtester.

Everything here is a pure function over :class:`~decimal.Decimal` values: no I/O,
no clock, no state. The same inputs always give the same fill.

Rules (Binance spot semantics):

* A **resting** limit BUY at price ``P`` fills when a trade prints at a price ``<= P``;
  a resting SELL fills when a trade prints at ``>= P``. The fill is at the order's
  own price ``P`` and the order is the **maker**.
* An order that **crosses on arrival** (BUY limit ``>=`` last price, SELL limit
  ``<=`` last price, or any MARKET order) fills immediately as **taker** at the
  last trade price.
* The fill quantity is the whole remaining quantity, unless a liquidity cap is
  given (for example the printed trade's quantity), in which case it is
  ``min(remaining, cap)``.
* Commission is charged in the asset received, as on Binance: a BUY pays it in
  the base asset (``qty * rate``), a SELL in the quote asset
  (``price * qty * rate``). It is rounded half-up to ``fee_places`` decimals.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from typing import Literal, TypeAlias

Side: TypeAlias = Literal["BUY", "SELL"]
Liquidity: TypeAlias = Literal["maker", "taker"]

ZERO = Decimal(0)


@dataclass(frozen=True, slots=True)
class FillDecision:
    """The outcome of matching one order against one price."""

    qty: Decimal
    price: Decimal
    liquidity: Liquidity
    fee: Decimal
    fee_asset_is_base: bool

    @property
    def quote_qty(self) -> Decimal:
        """Price times quantity (the quote amount exchanged, before fees)."""
        return self.price * self.qty

    @property
    def is_maker(self) -> bool:
        return self.liquidity == "maker"


def path_vertices(
    open_: Decimal, high: Decimal, low: Decimal, close: Decimal
) -> tuple[Decimal, Decimal, Decimal, Decimal]:
    """The price path inside a candle, the one rule the simulator and the backtester
    share: ``open``, then the *high* first when the candle closes down (``close < open``)
    and the *low* first otherwise, then the other extreme, then ``close``."""
    if close < open_:
        return (open_, high, low, close)
    return (open_, low, high, close)


#: The path's vertices are the first four trades of a candle spread evenly over its
#: interval: a simulator printing ``PATH_TRADES`` trades per candle prints exactly the
#: vertices, at the times the backtester fills at (the replay-parity setting).
PATH_TRADES = 4


def trade_time(open_time: int, interval_ms: int, index: int, count: int) -> int:
    """Time (ms) of trade ``index`` of ``count`` spread evenly over a candle: the
    simulator's synthetic tape and the backtester's vertex times."""
    return open_time + index * interval_ms // count


def vertex_times(open_time: int, interval_ms: int) -> tuple[int, int, int, int]:
    """When the path is at each of its four vertices (:data:`PATH_TRADES` trades)."""
    return (
        open_time,
        trade_time(open_time, interval_ms, 1, PATH_TRADES),
        trade_time(open_time, interval_ms, 2, PATH_TRADES),
        trade_time(open_time, interval_ms, 3, PATH_TRADES),
    )


def crosses(side: Side, limit_price: Decimal, trade_price: Decimal) -> bool:
    """True when a trade at ``trade_price`` reaches a limit order at ``limit_price``."""
    if side == "BUY":
        return trade_price <= limit_price
    return trade_price >= limit_price


def commission(
    side: Side, price: Decimal, qty: Decimal, rate: Decimal, fee_places: int = 8
) -> Decimal:
    """Commission for a fill, in the asset received (base for BUY, quote for SELL)."""
    raw = qty * rate if side == "BUY" else price * qty * rate
    return raw.quantize(Decimal(1).scaleb(-fee_places), rounding=ROUND_HALF_UP)


def _fill_qty(remaining: Decimal, cap: Decimal | None) -> Decimal:
    if remaining <= ZERO:
        return ZERO
    if cap is None:
        return remaining
    return min(remaining, cap) if cap > ZERO else ZERO


def resting_fill(
    side: Side,
    limit_price: Decimal,
    remaining_qty: Decimal,
    trade_price: Decimal,
    maker_fee: Decimal,
    *,
    liquidity_cap: Decimal | None = None,
    fee_places: int = 8,
) -> FillDecision | None:
    """Fill of a resting limit order against a printed trade, or ``None``.

    The fill, if any, is at the order's own price, as maker.
    """
    if not crosses(side, limit_price, trade_price):
        return None
    qty = _fill_qty(remaining_qty, liquidity_cap)
    if qty <= ZERO:
        return None
    return FillDecision(
        qty=qty,
        price=limit_price,
        liquidity="maker",
        fee=commission(side, limit_price, qty, maker_fee, fee_places),
        fee_asset_is_base=side == "BUY",
    )


def would_cross_on_arrival(side: Side, limit_price: Decimal, last_price: Decimal) -> bool:
    """True when a new limit order would take liquidity at the last trade price."""
    if side == "BUY":
        return limit_price >= last_price
    return limit_price <= last_price


def arrival_fill(
    side: Side,
    limit_price: Decimal | None,
    remaining_qty: Decimal,
    last_price: Decimal,
    taker_fee: Decimal,
    *,
    liquidity_cap: Decimal | None = None,
    fee_places: int = 8,
) -> FillDecision | None:
    """Immediate (taker) fill of a new order at the last trade price, or ``None``.

    ``limit_price`` is ``None`` for a MARKET order, which always fills.
    """
    if limit_price is not None and not would_cross_on_arrival(side, limit_price, last_price):
        return None
    qty = _fill_qty(remaining_qty, liquidity_cap)
    if qty <= ZERO:
        return None
    return FillDecision(
        qty=qty,
        price=last_price,
        liquidity="taker",
        fee=commission(side, last_price, qty, taker_fee, fee_places),
        fee_asset_is_base=side == "BUY",
    )
