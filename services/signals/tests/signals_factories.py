"""Test data for the signals tests: real Binance candles (repo data/klines and fixtures/)."""

from __future__ import annotations

import csv
import gzip
from decimal import Decimal
from functools import cache
from pathlib import Path

import polars as pl

from gridstream.common.messages import Candle, Signal
from gridstream.core.signals.engine import SignalEngine, SignalParams

DATA = Path(__file__).resolve().parents[3] / "data" / "klines"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
PAIRS = ("BTCUSDT", "ETHUSDT", "BNBUSDT", "SOLUSDT", "XRPUSDT")
MINUTE_MS = 60_000


def kline_path(symbol: str, interval: str = "1m", suffix: str = "") -> Path:
    """data/klines/<SYM>-1m.csv.gz, else fixtures/<SYM>-<interval><suffix>.csv.gz."""
    name = f"{symbol}-{interval}{suffix}.csv.gz"
    if interval == "1m" and not suffix:
        return DATA / name
    return FIXTURES / name


@cache
def kline_rows(path: Path) -> tuple[dict[str, str], ...]:
    with gzip.open(path, "rt") as f:
        return tuple(csv.DictReader(f))


def candle_of(symbol: str, interval: str, r: dict[str, str]) -> Candle:
    open_time, close_time = int(r["open_time_ms"]), int(r["close_time_ms"])
    return Candle(
        id=f"candle:{symbol}:{interval}:{open_time}",
        ts_event=(close_time + 1) * 1_000_000,
        ts_init=(close_time + 1) * 1_000_000,
        symbol=symbol,
        interval=interval,
        open_time=open_time,
        close_time=close_time,
        open=Decimal(r["open"]),
        high=Decimal(r["high"]),
        low=Decimal(r["low"]),
        close=Decimal(r["close"]),
        volume=Decimal(r["volume"]),
    )


def candles(
    symbol: str, interval: str = "1m", *, suffix: str = "", start: int = 0, n: int | None = None
) -> list[Candle]:
    rows = kline_rows(kline_path(symbol, interval, suffix))
    end = None if n is None else start + n
    return [candle_of(symbol, interval, r) for r in rows[start:end]]


def frame(
    symbol: str, interval: str = "1m", *, suffix: str = "", n: int | None = None
) -> pl.DataFrame:
    """The candle file as a frame: symbol, interval, open_time, open/high/low/close/volume."""
    df = pl.read_csv(kline_path(symbol, interval, suffix)).rename({"open_time_ms": "open_time"})
    if n is not None:
        df = df.head(n)
    return df.select(
        pl.lit(symbol).alias("symbol"),
        pl.lit(interval).alias("interval"),
        "open_time",
        *(pl.col(c).cast(pl.Float64) for c in ("open", "high", "low", "close", "volume")),
    )


def engine_signals(
    cs: list[Candle], params: SignalParams | None = None, *, higher: tuple[str, ...] = ()
) -> list[Signal]:
    eng = SignalEngine(params, higher=higher)
    return [s for c in cs for s in eng.on_candle(c)]


#: Small windows: warm after a few dozen candles (for tests that need signals quickly).
SMALL = SignalParams(
    sma_period=5,
    ema_period=5,
    rsi_period=4,
    atr_period=4,
    bb_period=5,
    adx_period=4,
    donchian_period=5,
    vol_window=5,
    vwap_window=5,
    trend_lookback=2,
    regime_window=10,
    min_dwell=2,
)
