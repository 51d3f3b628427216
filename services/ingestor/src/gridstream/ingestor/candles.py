"""Trades -> candles, incrementally, the way Binance builds its klines. Pure: no I/O, no clock.

A kline of interval ``I`` opening at ``t`` (a multiple of ``I`` since the epoch) covers the
trades with ``t <= T < t + I``: open = price of the first, close = price of the last,
high/low = extremes, volume = sum of quantities, quote volume = sum of price x quantity,
trades = how many exchange trades (an aggTrade stands for ``l - f + 1``), taker-buy
volume = the volume of trades whose buyer was the taker. An interval without trades is a
flat kline at the previous close with zero volume.

The builder cannot know that it saw the first trade of the bucket it starts in (it joined
mid-interval), so that bucket is *partial* and is not emitted unless the caller says the
feed starts at a bucket boundary (``emit_first``). After a reconnect call :meth:`reset`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Final

from gridstream.common.binance.market import NS_PER_MS, interval_ms
from gridstream.common.messages import Candle, Tick, deterministic_id

SOURCE_TRADES: Final = "trades"
QUOTE_QUANT: Final = Decimal("0.00000001")


def built_candle_id(symbol: str, interval: str, open_time: int) -> str:
    """Ids of built candles differ from exchange candles' so both can coexist downstream."""
    return deterministic_id("built", symbol, interval, open_time)


@dataclass(slots=True)
class _Bar:
    open_time: int
    open: Decimal
    high: Decimal
    low: Decimal
    close: Decimal
    volume: Decimal = field(default_factory=Decimal)
    quote_volume: Decimal = field(default_factory=Decimal)
    taker_buy_volume: Decimal = field(default_factory=Decimal)
    trades: int = 0
    complete: bool = True

    def add(self, price: Decimal, qty: Decimal, trades: int, taker_buy: bool) -> None:
        if self.trades == 0:  # a bucket opened flat (no trade yet): its first trade opens it
            self.open = self.high = self.low = price
        if price > self.high:
            self.high = price
        if price < self.low:
            self.low = price
        self.close = price
        self.volume += qty
        self.quote_volume += price * qty
        if taker_buy:
            self.taker_buy_volume += qty
        self.trades += trades


@dataclass(frozen=True, slots=True)
class BuiltCandle:
    """A candle built from trades, with what a ``Candle`` cannot hold."""

    candle: Candle
    taker_buy_volume: Decimal


_NONE: Final[list[BuiltCandle]] = []


class CandleBuilder:
    """Per-symbol incremental candles of one interval from trades, in event time."""

    def __init__(self, interval: str = "1m", *, emit_first: bool = False) -> None:
        self.interval = interval
        self.step = interval_ms(interval)
        self.emit_first = emit_first
        self._bars: dict[str, _Bar] = {}
        self._last_close: dict[str, Decimal] = {}
        self.late = 0

    def reset(self, symbol: str | None = None) -> None:
        """Forget the forming bucket(s): the next one is partial again (e.g. after a reconnect)."""
        if symbol is None:
            self._bars.clear()
            self._last_close.clear()
        else:
            self._bars.pop(symbol, None)
            self._last_close.pop(symbol, None)

    def on_tick(self, tick: Tick, trades: int = 1) -> list[BuiltCandle]:
        """One trade (``trades`` exchange trades for an aggTrade) -> candles it closed."""
        bar = self._bars.get(tick.symbol)
        t = tick.ts_event // NS_PER_MS
        if bar is not None and bar.open_time <= t < bar.open_time + self.step:
            bar.add(tick.price, tick.qty, trades if trades > 0 else 1, tick.side == "BUY")
            return _NONE  # the hot path: a trade inside the bucket being built
        return self.add(
            tick.symbol,
            tick.ts_event // NS_PER_MS,
            tick.price,
            tick.qty,
            trades=trades,
            taker_buy=tick.side == "BUY",
        )

    def add(
        self,
        symbol: str,
        time_ms: int,
        price: Decimal,
        qty: Decimal,
        *,
        trades: int = 1,
        taker_buy: bool = False,
    ) -> list[BuiltCandle]:
        """One trade -> the complete candles it closed (oldest first)."""
        bucket = time_ms - time_ms % self.step
        bar = self._bars.get(symbol)
        out: list[BuiltCandle] = []
        if bar is None:
            bar = _Bar(bucket, price, price, price, price, complete=self.emit_first)
            self._bars[symbol] = bar
        elif bucket < bar.open_time:
            self.late += 1  # a trade of a bucket already closed: cannot change it
            return out
        elif bucket > bar.open_time:
            out = self._close_until(symbol, bucket)
            bar = _Bar(bucket, price, price, price, price)
            self._bars[symbol] = bar
        bar.add(price, qty, max(trades, 1), taker_buy)
        return out

    def advance(self, symbol: str, now_ms: int) -> list[BuiltCandle]:
        """Event time reached ``now_ms`` (e.g. a closed kline's event time): close the
        buckets that ended before it, flat ones included."""
        bar = self._bars.get(symbol)
        if bar is None:
            return []
        bucket = now_ms - now_ms % self.step
        if bucket <= bar.open_time:
            return []
        out = self._close_until(symbol, bucket)
        prev = self._last_close[symbol]
        self._bars[symbol] = _Bar(bucket, prev, prev, prev, prev)
        return out

    def forming(self, symbol: str) -> BuiltCandle | None:
        """The bucket being built, as a candle (complete or not)."""
        bar = self._bars.get(symbol)
        return None if bar is None else self._candle(symbol, bar)

    def _close_until(self, symbol: str, bucket: int) -> list[BuiltCandle]:
        """Close the current bar and emit flat bars for empty buckets before ``bucket``."""
        bar = self._bars[symbol]
        out: list[BuiltCandle] = []
        if bar.complete:
            out.append(self._candle(symbol, bar))
        prev = bar.close
        t = bar.open_time + self.step
        while t < bucket:
            out.append(self._candle(symbol, _Bar(t, prev, prev, prev, prev)))
            t += self.step
        self._last_close[symbol] = prev
        return out

    def _candle(self, symbol: str, bar: _Bar) -> BuiltCandle:
        close_time = bar.open_time + self.step - 1
        ts = close_time * NS_PER_MS
        return BuiltCandle(
            Candle(
                id=built_candle_id(symbol, self.interval, bar.open_time),
                ts_event=ts,
                ts_init=ts,
                symbol=symbol,
                interval=self.interval,
                open_time=bar.open_time,
                close_time=close_time,
                open=bar.open,
                high=bar.high,
                low=bar.low,
                close=bar.close,
                volume=bar.volume,
                quote_volume=bar.quote_volume.quantize(QUOTE_QUANT),
                trades=bar.trades,
                source=SOURCE_TRADES,
            ),
            bar.taker_buy_volume,
        )


def differences(built: Candle, exchange: Candle) -> list[str]:
    """The fields in which a built candle disagrees with the exchange's kline (empty: agree).

    Quote volume is compared at Binance's 8 decimals; a kline without a trade count
    (``trades`` 0 with volume, e.g. from a file that lacks it) skips that field.
    """
    diffs: list[str] = []
    for name in ("open_time", "open", "high", "low", "close", "volume"):
        if getattr(built, name) != getattr(exchange, name):
            diffs.append(
                f"{name}: built {getattr(built, name)} != exchange {getattr(exchange, name)}"
            )
    if exchange.quote_volume and built.quote_volume != exchange.quote_volume.quantize(QUOTE_QUANT):
        diffs.append(f"quote_volume: built {built.quote_volume} != {exchange.quote_volume}")
    if (exchange.trades or not exchange.volume) and built.trades != exchange.trades:
        diffs.append(f"trades: built {built.trades} != exchange {exchange.trades}")
    return diffs
