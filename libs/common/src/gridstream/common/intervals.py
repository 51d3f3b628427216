"""Binance's kline intervals, in milliseconds: the one table (no network client imported,
so a backtest or the kernel can read it without loading aiohttp)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

MINUTE_MS: Final = 60_000
DAY_MS: Final = 86_400_000

#: Milliseconds per Binance kline interval (``1M`` is omitted: months vary in length).
INTERVAL_MS: Final[Mapping[str, int]] = {
    "1s": 1_000,
    "1m": MINUTE_MS,
    "3m": 3 * MINUTE_MS,
    "5m": 5 * MINUTE_MS,
    "15m": 15 * MINUTE_MS,
    "30m": 30 * MINUTE_MS,
    "1h": 60 * MINUTE_MS,
    "2h": 120 * MINUTE_MS,
    "4h": 240 * MINUTE_MS,
    "6h": 360 * MINUTE_MS,
    "8h": 480 * MINUTE_MS,
    "12h": 720 * MINUTE_MS,
    "1d": DAY_MS,
    "3d": 3 * DAY_MS,
    "1w": 7 * DAY_MS,
}

#: The intervals from one minute to one day (what candles are built and replayed in).
MINUTE_TO_DAY_MS: Final[Mapping[str, int]] = {
    k: v for k, v in INTERVAL_MS.items() if MINUTE_MS <= v <= DAY_MS
}
