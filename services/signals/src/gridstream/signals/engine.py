"""The signals engine: incremental indicators per (symbol, interval), constant cost per candle.

Pure and synchronous: candles in, :class:`Signal` out; no I/O, no clock reads. Times
come from the candles. The same numbers are computed over a whole history, with Polars
expressions, by :func:`gridstream.signals.frame.compute_frame`; a test proves both agree.

Indicators (``i`` = index of the candle in the series, from 0):

* EMA(``ema_period`` = p): TA-Lib seeding; the first value, at ``i = p-1``, is the SMA of the
  first p closes, then ``ema = (1-a)*ema + a*close`` with ``a = 2/(p+1)``.
* ATR(``atr_period`` = n), Wilder: the true range needs the previous close, so it starts at
  ``i = 1``; the first ATR, at ``i = n``, is the SMA of the first n true ranges, then
  ``atr = (1-1/n)*atr + tr/n`` (TA-Lib's ATR).
* volatility(``vol_window`` = w): population standard deviation of the last w log returns
  ``ln(close_i / close_{i-1})``, first at ``i = w``.
* trend(``trend_lookback`` = k): EMA slope in ATRs per candle,
  ``(ema_i - ema_{i-k}) / (k * atr_i)``, first at ``i = p-1+k``.
* regime: ``warmup`` until every indicator is defined (and ``min_warmup`` candles were seen);
  then ``high_volatility`` when ``atr/close > high_vol_threshold``, ``trend_up`` /
  ``trend_down`` when ``|trend| > trend_threshold``, else ``range``.

Candles whose open time is not after the last one seen for their (symbol, interval) are
dropped (duplicates, out of order). A gap (missing candles) is not filled here: indicators
continue over the candles that did arrive (the ingestor fills gaps before data flows).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from gridstream.common.messages import Candle, Regime, Signal, deterministic_id

#: Kind tag of signal ids: ``deterministic_id(SIGNAL_ID_KIND, symbol, interval, open_time)``.
SIGNAL_ID_KIND = "signal"


@dataclass(frozen=True, slots=True)
class SignalParams:
    """Indicator parameters (see the module docstring)."""

    ema_period: int = 20
    atr_period: int = 14
    vol_window: int = 60
    trend_lookback: int = 5
    trend_threshold: float = 0.25
    high_vol_threshold: float = 0.003
    min_warmup: int = 0

    def __post_init__(self) -> None:
        for name in ("ema_period", "atr_period", "vol_window", "trend_lookback"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1")
        if self.vol_window < 2:
            raise ValueError("vol_window: must be >= 2")
        if self.trend_threshold < 0 or self.high_vol_threshold <= 0:
            raise ValueError("thresholds: trend_threshold >= 0 and high_vol_threshold > 0")
        if self.min_warmup < 0:
            raise ValueError("min_warmup: must be >= 0")

    @property
    def warmup(self) -> int:
        """Candles needed before the first signal: every indicator is defined at that one."""
        first_index = max(
            self.ema_period - 1 + self.trend_lookback, self.atr_period, self.vol_window
        )
        return max(first_index + 1, self.min_warmup)


def signal_id(symbol: str, interval: str, open_time: int) -> str:
    """The deterministic id of the signal of one candle."""
    return deterministic_id(SIGNAL_ID_KIND, symbol, interval, open_time)


def classify(params: SignalParams, *, warm: bool, close: float, atr: float, trend: float) -> Regime:
    """The regime of one candle's indicator values (shared by engine and batch frame)."""
    if not warm:
        return "warmup"
    if close > 0 and atr / close > params.high_vol_threshold:
        return "high_volatility"
    if trend > params.trend_threshold:
        return "trend_up"
    if trend < -params.trend_threshold:
        return "trend_down"
    return "range"


@dataclass(slots=True)
class _Series:
    """Running state of one (symbol, interval)."""

    ema_period: int
    atr_period: int
    vol_window: int
    trend_lookback: int
    count: int = 0
    last_open_time: int = -1
    prev_close: float = math.nan
    ema_seed_sum: float = 0.0
    ema: float = math.nan
    atr_seed_sum: float = 0.0
    atr: float = math.nan
    returns: deque[float] = field(default_factory=deque)
    ret_sum: float = 0.0
    ret_sumsq: float = 0.0
    since_resum: int = 0
    emas: deque[float] = field(default_factory=deque)

    def update(self, high: float, low: float, close: float) -> None:
        i = self.count
        self.count += 1
        # EMA, SMA-seeded.
        p = self.ema_period
        if i < p:
            self.ema_seed_sum += close
            if i == p - 1:
                self.ema = self.ema_seed_sum / p
        else:
            alpha = 2.0 / (p + 1)
            self.ema = (1.0 - alpha) * self.ema + alpha * close
        if i >= p - 1:
            self.emas.append(self.ema)
            if len(self.emas) > self.trend_lookback + 1:
                self.emas.popleft()
        if i >= 1:
            prev = self.prev_close
            # ATR, Wilder, seeded with the SMA of the first n true ranges.
            tr = max(high - low, abs(high - prev), abs(low - prev))
            n = self.atr_period
            if i <= n:
                self.atr_seed_sum += tr
                if i == n:
                    self.atr = self.atr_seed_sum / n
            else:
                self.atr = (1.0 - 1.0 / n) * self.atr + tr / n
            # Rolling sums of log returns; re-summed once per window against drift.
            r = math.log(close / prev)
            self.returns.append(r)
            self.ret_sum += r
            self.ret_sumsq += r * r
            if len(self.returns) > self.vol_window:
                old = self.returns.popleft()
                self.ret_sum -= old
                self.ret_sumsq -= old * old
            self.since_resum += 1
            if self.since_resum >= self.vol_window:
                self.since_resum = 0
                self.ret_sum = math.fsum(self.returns)
                self.ret_sumsq = math.fsum(x * x for x in self.returns)
        self.prev_close = close

    @property
    def volatility(self) -> float:
        w = len(self.returns)
        if w < self.vol_window:
            return math.nan
        mean = self.ret_sum / w
        return math.sqrt(max(self.ret_sumsq / w - mean * mean, 0.0))

    @property
    def trend(self) -> float:
        if len(self.emas) <= self.trend_lookback:
            return math.nan
        if not self.atr > 0:
            return 0.0
        return (self.emas[-1] - self.emas[0]) / (self.trend_lookback * self.atr)


class SignalEngine:
    """Incremental indicators for any number of (symbol, interval) series."""

    def __init__(self, params: SignalParams | None = None) -> None:
        self.params = params or SignalParams()
        self._series: dict[tuple[str, str], _Series] = {}

    @property
    def warmup(self) -> int:
        """Candles a series needs before its first signal."""
        return self.params.warmup

    def seen(self, symbol: str, interval: str) -> int:
        """How many candles of this series were taken (duplicates excluded)."""
        s = self._series.get((symbol, interval))
        return 0 if s is None else s.count

    def last_open_time(self, symbol: str, interval: str) -> int | None:
        """Open time (ms) of the newest candle taken for this series, if any."""
        s = self._series.get((symbol, interval))
        return None if s is None or s.count == 0 else s.last_open_time

    def _get(self, key: tuple[str, str]) -> _Series:
        s = self._series.get(key)
        if s is None:
            p = self.params
            s = _Series(p.ema_period, p.atr_period, p.vol_window, p.trend_lookback)
            self._series[key] = s
        return s

    def on_candle(self, candle: Candle) -> list[Signal]:
        """Take one closed candle; returns its signal once the series is warm, else nothing."""
        s = self._get((candle.symbol, candle.interval))
        if candle.open_time <= s.last_open_time:
            return []
        s.last_open_time = candle.open_time
        close = float(candle.close)
        s.update(float(candle.high), float(candle.low), close)
        if s.count < self.warmup:
            return []
        trend = s.trend
        return [
            Signal(
                id=signal_id(candle.symbol, candle.interval, candle.open_time),
                ts_event=candle.ts_event,
                ts_init=candle.ts_init,
                symbol=candle.symbol,
                interval=candle.interval,
                open_time=candle.open_time,
                close=candle.close,
                ema=s.ema,
                atr=s.atr,
                volatility=s.volatility,
                trend=trend,
                regime=classify(self.params, warm=True, close=close, atr=s.atr, trend=trend),
            )
        ]
