"""Higher-interval candles (5m, 15m, 1h, ...) built from closed 1m candles.

A bucket starts at a multiple of the interval since the epoch (UTC), as Binance's do. The
bucket's candle is emitted when the base candle that ends it arrives (its close time is the
bucket's), and only if every base candle of the bucket was seen: then its OHLCV equals
Binance's own candle of that interval. A bucket left incomplete by a gap is dropped (and
counted in :attr:`CandleAggregator.incomplete`), never emitted half-built. Base candles must
arrive in order without duplicates (the engine filters them first).
"""

from __future__ import annotations

from decimal import Decimal
from typing import Final

from gridstream.common.intervals import MINUTE_MS as MINUTE_MS
from gridstream.common.intervals import MINUTE_TO_DAY_MS
from gridstream.common.messages import Candle, deterministic_id

#: Binance's kline intervals that are whole minutes, up to a day, in milliseconds.
INTERVAL_MS: Final = MINUTE_TO_DAY_MS
#: Source tag of candles built here.
AGG_SOURCE: Final = "agg"


def interval_ms(interval: str) -> int:
    try:
        return INTERVAL_MS[interval]
    except KeyError:
        raise ValueError(
            f"unknown interval {interval!r}; known: {', '.join(INTERVAL_MS)}"
        ) from None


def ratio(base: str, interval: str) -> int:
    """How many ``base`` candles make one ``interval`` candle (ValueError if not whole)."""
    b, t = interval_ms(base), interval_ms(interval)
    if t <= b or t % b:
        raise ValueError(f"{interval} is not a whole multiple (> 1) of {base}")
    return t // b


def candle_id(symbol: str, interval: str, open_time: int) -> str:
    return deterministic_id("candle", symbol, interval, open_time)


class CandleAggregator:
    """Builds one symbol's ``interval`` candles from its ``base`` candles, O(1) per candle."""

    __slots__ = (
        "base_ms",
        "close",
        "count",
        "high",
        "incomplete",
        "interval",
        "low",
        "ms",
        "need",
        "open",
        "quote_volume",
        "start",
        "symbol",
        "trades",
        "volume",
    )

    def __init__(self, symbol: str, interval: str, base: str = "1m") -> None:
        self.symbol = symbol
        self.interval = interval
        self.need = ratio(base, interval)
        self.ms = interval_ms(interval)
        self.base_ms = interval_ms(base)
        self.start = -1
        self.count = 0
        self.open = self.high = self.low = self.close = Decimal(0)
        self.volume = self.quote_volume = Decimal(0)
        self.trades = 0
        self.incomplete = 0

    def add(self, c: Candle) -> Candle | None:
        """Take the next base candle; returns the bucket's candle when this one closes it."""
        start = c.open_time - c.open_time % self.ms
        if start != self.start:
            if self.count:
                self.incomplete += 1
            self.start = start
            self.count = 1
            self.open, self.high, self.low, self.close = c.open, c.high, c.low, c.close
            self.volume, self.quote_volume, self.trades = c.volume, c.quote_volume, c.trades
        else:
            self.count += 1
            if c.high > self.high:
                self.high = c.high
            if c.low < self.low:
                self.low = c.low
            self.close = c.close
            self.volume += c.volume
            self.quote_volume += c.quote_volume
            self.trades += c.trades
        if c.open_time + self.base_ms != start + self.ms:
            return None
        complete = self.count == self.need
        self.count = 0
        self.start = -1
        if not complete:
            self.incomplete += 1
            return None
        return Candle(
            id=candle_id(self.symbol, self.interval, start),
            ts_event=c.ts_event,
            ts_init=c.ts_init,
            symbol=self.symbol,
            interval=self.interval,
            open_time=start,
            close_time=start + self.ms - 1,
            open=self.open,
            high=self.high,
            low=self.low,
            close=self.close,
            volume=self.volume,
            quote_volume=self.quote_volume,
            trades=self.trades,
            source=AGG_SOURCE,
        )
