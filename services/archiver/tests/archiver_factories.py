"""Small factories for archiver test data."""

from __future__ import annotations

from decimal import Decimal

from gridstream.common.messages import Candle, OrderAccepted, OrderFilled, deterministic_id

MINUTE_MS = 60_000
DAY_MS = 86_400_000
#: 2024-03-01T00:00:00Z
T0_MS = 1_709_251_200_000


def candle(symbol: str = "BTCUSDT", i: int = 0, *, start_ms: int = T0_MS, **kw: object) -> Candle:
    open_time = start_ms + i * MINUTE_MS
    fields: dict[str, object] = {
        "id": deterministic_id("candle", symbol, "1m", open_time),
        "ts_event": (open_time + MINUTE_MS) * 1_000_000,
        "ts_init": (open_time + MINUTE_MS) * 1_000_000 + 5,
        "symbol": symbol,
        "interval": "1m",
        "open_time": open_time,
        "close_time": open_time + MINUTE_MS - 1,
        "open": Decimal("64000.10000000") + i,
        "high": Decimal("64100.00000000") + i,
        "low": Decimal("63900.01000000") + i,
        "close": Decimal("64050.99999999") + i,
        "volume": Decimal("0.00000001") * (i + 1),
        "quote_volume": Decimal("1E-8"),
        "trades": 10 + i,
    }
    fields.update(kw)
    return Candle(**fields)  # type: ignore[arg-type]


def fill(symbol: str = "BTCUSDT", n: int = 0, *, ts_ms: int = T0_MS) -> OrderFilled:
    return OrderFilled(
        id=f"fill-{symbol}-{n}",
        ts_event=ts_ms * 1_000_000,
        ts_init=ts_ms * 1_000_000 + 1,
        symbol=symbol,
        client_order_id=f"gs-{n}",
        venue_order_id=str(1000 + n),
        trade_id=str(5000 + n),
        side="BUY",
        price=Decimal("64000.01"),
        qty=Decimal("0.00015000"),
        fee=Decimal("0.00000015"),
        fee_asset="BTC",
        liquidity="maker",
        venue="simulator",
    )


def accepted(symbol: str = "BTCUSDT", n: int = 0) -> OrderAccepted:
    return OrderAccepted(
        id=f"acc-{symbol}-{n}",
        ts_event=T0_MS * 1_000_000,
        ts_init=T0_MS * 1_000_000,
        symbol=symbol,
        client_order_id=f"gs-{n}",
        venue_order_id=str(1000 + n),
        side="BUY",
        price=Decimal("64000.01"),
        qty=Decimal("0.00015000"),
    )
