"""Small factories for every message kind (tests only)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from gridstream.common import messages as m

_T0 = 1_774_267_740_000_000_000


def _base(**kw: Any) -> dict[str, Any]:
    base = {"id": m.new_id(), "ts_event": _T0, "ts_init": _T0 + 1_000}
    base.update(kw)
    return base


def tick(**kw: Any) -> m.Tick:
    args = dict(
        symbol="BTCUSDT", trade_id=1, price=Decimal("70070.53"), qty=Decimal("0.00123"), side="BUY"
    )
    args.update(kw)
    return m.Tick(**_base(**args))


def candle(**kw: Any) -> m.Candle:
    args = dict(
        symbol="BTCUSDT",
        interval="1m",
        open_time=1774267740000,
        close_time=1774267799999,
        open=Decimal("69979.98"),
        high=Decimal("70112.55"),
        low=Decimal("69973.41"),
        close=Decimal("70070.53"),
        volume=Decimal("32.55652"),
    )
    args.update(kw)
    return m.Candle(**_base(**args))


def signal(**kw: Any) -> m.Signal:
    args = dict(
        symbol="BTCUSDT",
        interval="1m",
        open_time=1774267740000,
        close=Decimal("70070.53"),
        ema=70000.1,
        atr=55.5,
        volatility=0.0012,
        trend=0.3,
        regime="range",
    )
    args.update(kw)
    return m.Signal(**_base(**args))


def intent(**kw: Any) -> m.OrderIntent:
    args = dict(
        action="place",
        symbol="BTCUSDT",
        client_order_id="gs-btc-1-B-1",
        side="BUY",
        price=Decimal("69900.00"),
        qty=Decimal("0.00029"),
        level=1,
    )
    args.update(kw)
    return m.OrderIntent(**_base(**args))


def approved(**kw: Any) -> m.OrderApproved:
    args = dict(
        intent_id="i1",
        action="place",
        symbol="BTCUSDT",
        client_order_id="gs-btc-1-B-1",
        side="BUY",
        price=Decimal("69900.00"),
        qty=Decimal("0.00029"),
    )
    args.update(kw)
    return m.OrderApproved(**_base(**args))


def rejected(**kw: Any) -> m.OrderRejected:
    args = dict(
        intent_id="i1",
        action="place",
        symbol="BTCUSDT",
        client_order_id="gs-btc-1-B-1",
        reason="NOTIONAL",
        detail="notional 4.2 < 5",
    )
    args.update(kw)
    return m.OrderRejected(**_base(**args))


def accepted(**kw: Any) -> m.OrderAccepted:
    args = dict(
        symbol="BTCUSDT",
        client_order_id="gs-btc-1-B-1",
        venue_order_id="12345",
        side="BUY",
        price=Decimal("69900.00"),
        qty=Decimal("0.00029"),
    )
    args.update(kw)
    return m.OrderAccepted(**_base(**args))


def canceled(**kw: Any) -> m.OrderCanceled:
    args = dict(symbol="BTCUSDT", client_order_id="gs-btc-1-B-1", venue_order_id="12345")
    args.update(kw)
    return m.OrderCanceled(**_base(**args))


def filled(**kw: Any) -> m.OrderFilled:
    args = dict(
        symbol="BTCUSDT",
        client_order_id="gs-btc-1-B-1",
        venue_order_id="12345",
        trade_id="777",
        side="BUY",
        price=Decimal("69900.00"),
        qty=Decimal("0.00029"),
        fee=Decimal("0.00000029"),
        fee_asset="BTC",
        liquidity="maker",
        venue="simulator",
    )
    args.update(kw)
    return m.OrderFilled(**_base(**args))


def failed(**kw: Any) -> m.OrderFailed:
    args = dict(
        symbol="BTCUSDT",
        client_order_id="gs-btc-1-B-1",
        action="place",
        code=-2010,
        reason="Account has insufficient balance for requested action.",
    )
    args.update(kw)
    return m.OrderFailed(**_base(**args))


ALL = (tick, candle, signal, intent, approved, rejected, accepted, canceled, filled, failed)
