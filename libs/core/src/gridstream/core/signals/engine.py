"""The signals engine: incremental indicators per (symbol, interval), constant cost per candle.

Pure and synchronous: candles in, :class:`Signal` out; no I/O, no clock reads. Times come
from the candles. The same numbers are computed over a whole history, with Polars
expressions, by :func:`gridstream.core.signals.frame.compute_frame`; a test proves both agree on
real data (no lookahead), and another that both match TA-Lib.

Indicator definitions are in :mod:`gridstream.core.signals.indicators`; the regime rule is in
:class:`RegimeTracker` and services/signals/README.md. Besides those, ``trend`` is the EMA
slope in ATRs per candle, ``(ema_i - ema_{i-k}) / (k * atr_i)`` (0 when the ATR is 0), and
``bb_width_z`` the z-score of the Bollinger width against its own last ``regime_window``
values (0 when they are all equal).

Multi-timeframe: 1m candles (the ``base`` interval) also feed one
:class:`~gridstream.core.signals.timeframes.CandleAggregator` per higher interval; each completed
bucket is a candle of its interval and gets its own series and signals. A candle of another
interval given directly is a series of its own.

Candles whose open time is not after the last one seen for their (symbol, interval) are
dropped (duplicates, out of order). A gap is not filled here: indicators continue over the
candles that did arrive (the ingestor fills gaps before data flows); a higher-interval bucket
with a missing base candle is dropped.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Final

from gridstream.common.messages import Candle, Regime, Signal, deterministic_id
from gridstream.core.signals.indicators import (
    Directional,
    Ema,
    MonotonicExtreme,
    RollingStats,
    RollingSum,
    Wilder,
    true_range,
)
from gridstream.core.signals.timeframes import CandleAggregator, ratio

#: Kind tag of signal ids: ``deterministic_id(SIGNAL_ID_KIND, symbol, interval, open_time)``.
SIGNAL_ID_KIND: Final = "signal"

#: Every indicator value carried in ``Signal.values`` (and a column of the batch frame).
INDICATORS: Final = (
    "sma",
    "ema",
    "rsi",
    "atr",
    "bb_middle",
    "bb_upper",
    "bb_lower",
    "bb_width",
    "plus_di",
    "minus_di",
    "adx",
    "dc_upper",
    "dc_lower",
    "dc_middle",
    "volatility",
    "vwap",
    "trend",
    "bb_width_z",
)


@dataclass(frozen=True, slots=True)
class SignalParams:
    """Indicator periods and the regime rule's thresholds (see the module docstrings)."""

    sma_period: int = 20
    ema_period: int = 20
    rsi_period: int = 14
    atr_period: int = 14
    bb_period: int = 20
    bb_k: float = 2.0
    adx_period: int = 14
    donchian_period: int = 20
    vol_window: int = 60
    vwap_window: int = 60
    trend_lookback: int = 5
    #: History of the Bollinger width its z-score is taken against.
    regime_window: int = 240
    adx_enter: float = 25.0
    adx_exit: float = 20.0
    vol_enter_z: float = 2.0
    vol_exit_z: float = 1.0
    min_dwell: int = 5
    min_warmup: int = 0

    def __post_init__(self) -> None:
        for name in (
            "sma_period",
            "ema_period",
            "rsi_period",
            "atr_period",
            "donchian_period",
            "vwap_window",
            "trend_lookback",
            "min_dwell",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1")
        for name in ("bb_period", "adx_period", "vol_window", "regime_window"):
            if getattr(self, name) < 2:
                raise ValueError(f"{name}: must be >= 2")
        if not self.bb_k > 0:
            raise ValueError("bb_k: must be > 0")
        if not 0 <= self.adx_exit <= self.adx_enter:
            raise ValueError("adx_exit: must be in [0, adx_enter]")
        if not self.vol_exit_z <= self.vol_enter_z:
            raise ValueError("vol_exit_z: must be <= vol_enter_z")
        if self.min_warmup < 0:
            raise ValueError("min_warmup: must be >= 0")

    def lookbacks(self) -> dict[str, int]:
        """Index (from 0) of each indicator's first value in its series (TA-Lib's lookback)."""
        bb = self.bb_period - 1
        adx = self.adx_period
        dc = self.donchian_period - 1
        return {
            "sma": self.sma_period - 1,
            "ema": self.ema_period - 1,
            "rsi": self.rsi_period,
            "atr": self.atr_period,
            "bb_middle": bb,
            "bb_upper": bb,
            "bb_lower": bb,
            "bb_width": bb,
            "plus_di": adx,
            "minus_di": adx,
            "adx": 2 * adx - 1,
            "dc_upper": dc,
            "dc_lower": dc,
            "dc_middle": dc,
            "volatility": self.vol_window,
            "vwap": self.vwap_window - 1,
            "trend": max(self.ema_period - 1 + self.trend_lookback, self.atr_period),
            "bb_width_z": bb + self.regime_window - 1,
        }

    @property
    def regime_lookback(self) -> int:
        """Index of the first classified candle: ADX and the width's z-score both defined."""
        lb = self.lookbacks()
        return max(lb["adx"], lb["bb_width_z"])

    @property
    def warmup(self) -> int:
        """Candles needed before the first signal: every indicator is defined at that one."""
        return max(max(self.lookbacks().values()) + 1, self.min_warmup)


def make_signal(candle: Candle, values: dict[str, float], regime: Regime) -> Signal:
    """The signal of one candle from its indicator values and regime (the engine's and the
    batch path's one way to build it)."""
    return Signal(
        id=signal_id(candle.symbol, candle.interval, candle.open_time),
        ts_event=candle.ts_event,
        ts_init=candle.ts_init,
        symbol=candle.symbol,
        interval=candle.interval,
        open_time=candle.open_time,
        close=candle.close,
        ema=values["ema"],
        atr=values["atr"],
        volatility=values["volatility"],
        trend=values["trend"],
        regime=regime,
        values=values,
    )


def signal_id(symbol: str, interval: str, open_time: int) -> str:
    """The deterministic id of the signal of one candle."""
    return deterministic_id(SIGNAL_ID_KIND, symbol, interval, open_time)


class RegimeTracker:
    """The regime rule with hysteresis, one step per candle (shared by engine and batch).

    Wanted state from this candle's values: ``high_volatility`` when the Bollinger width's
    z-score is above ``vol_enter_z`` (or, when already there, still above ``vol_exit_z``);
    else a trend when ADX is above ``adx_enter`` (or, when already trending, still at least
    ``adx_exit``): ``trend_up`` if +DI > -DI, else ``trend_down``; else ``range``. The state
    moves to the wanted one at once for ``high_volatility`` (the grid must pause without
    delay), otherwise only after the current state has lasted ``min_dwell`` candles.
    """

    __slots__ = ("dwell", "p", "state")

    def __init__(self, params: SignalParams) -> None:
        self.p = params
        self.state: Regime = "range"
        self.dwell = params.min_dwell

    def step(self, adx: float, plus_di: float, minus_di: float, width_z: float) -> Regime:
        p = self.p
        state = self.state
        want: Regime
        if width_z > (p.vol_exit_z if state == "high_volatility" else p.vol_enter_z):
            want = "high_volatility"
        elif adx > p.adx_enter or (state in ("trend_up", "trend_down") and adx >= p.adx_exit):
            want = "trend_up" if plus_di > minus_di else "trend_down"
        else:
            want = "range"
        if want != state and (want == "high_volatility" or self.dwell >= p.min_dwell):
            self.state = want
            self.dwell = 1
        else:
            self.dwell += 1
        return self.state


@dataclass(slots=True)
class _Series:
    """Running state of one (symbol, interval)."""

    p: SignalParams
    count: int = 0
    last_open_time: int = -1
    prev_close: float = math.nan
    sma: RollingStats = field(init=False)
    ema: Ema = field(init=False)
    gain: Wilder = field(init=False)
    loss: Wilder = field(init=False)
    atr: Wilder = field(init=False)
    bb: RollingStats = field(init=False)
    dmi: Directional = field(init=False)
    dc_high: MonotonicExtreme = field(init=False)
    dc_low: MonotonicExtreme = field(init=False)
    rets: RollingStats = field(init=False)
    pv: RollingSum = field(init=False)
    vol: RollingSum = field(init=False)
    traded: deque[bool] = field(init=False)
    traded_count: int = 0
    emas: deque[float] = field(init=False)
    widths: RollingStats = field(init=False)
    regime: RegimeTracker = field(init=False)
    lb: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        p = self.p
        self.sma = RollingStats(p.sma_period)
        self.ema = Ema(p.ema_period)
        self.gain = Wilder(p.rsi_period)
        self.loss = Wilder(p.rsi_period)
        self.atr = Wilder(p.atr_period)
        self.bb = RollingStats(p.bb_period)
        self.dmi = Directional(p.adx_period)
        self.dc_high = MonotonicExtreme(p.donchian_period, maximum=True)
        self.dc_low = MonotonicExtreme(p.donchian_period, maximum=False)
        self.rets = RollingStats(p.vol_window)
        self.pv = RollingSum(p.vwap_window)
        self.vol = RollingSum(p.vwap_window)
        self.traded = deque()
        self.emas = deque()
        self.widths = RollingStats(p.regime_window)
        self.regime = RegimeTracker(p)
        self.lb = p.lookbacks()

    def update(self, high: float, low: float, close: float, volume: float) -> dict[str, float]:
        """Take one candle; returns every indicator's value (NaN before its warm-up)."""
        p = self.p
        i = self.count
        self.count += 1
        prev = self.prev_close
        self.prev_close = close
        self.sma.push(close)
        ema = self.ema.push(close)
        self.bb.push(close)
        self.dmi.push(high, low, close)
        dc_upper = self.dc_high.push(high)
        dc_lower = self.dc_low.push(low)
        atr = math.nan
        if i >= 1:
            change = close - prev
            self.gain.push(change if change > 0 else 0.0)
            self.loss.push(-change if change < 0 else 0.0)
            atr = self.atr.push(true_range(high, low, prev))
            self.rets.push(math.log(close / prev))
        self.pv.push((high + low + close) / 3.0 * volume)
        self.vol.push(volume)
        traded = volume > 0
        self.traded.append(traded)
        self.traded_count += traded
        if len(self.traded) > p.vwap_window:
            self.traded_count -= self.traded.popleft()
        if i >= p.ema_period - 1:
            self.emas.append(ema)
            if len(self.emas) > p.trend_lookback + 1:
                self.emas.popleft()

        lb = self.lb
        nan = math.nan
        out = dict.fromkeys(INDICATORS, nan)
        if i >= lb["sma"]:
            out["sma"] = self.sma.mean
        if i >= lb["ema"]:
            out["ema"] = ema
        if i >= lb["rsi"]:
            g, lo = self.gain.value, self.loss.value
            out["rsi"] = 0.0 if -1e-14 < g + lo < 1e-14 else 100.0 * (g / (g + lo))
        if i >= lb["atr"]:
            out["atr"] = atr
        if i >= lb["bb_middle"]:
            mid = self.bb.mean
            dev = p.bb_k * self.bb.std()
            upper, lower = mid + dev, mid - dev
            width = (upper - lower) / mid if mid != 0 else 0.0
            out["bb_middle"], out["bb_upper"], out["bb_lower"] = mid, upper, lower
            out["bb_width"] = width
            self.widths.push(width)
        if i >= lb["plus_di"]:
            out["plus_di"] = self.dmi.plus_di
            out["minus_di"] = self.dmi.minus_di
        if i >= lb["adx"]:
            out["adx"] = self.dmi.adx
        if i >= lb["dc_upper"]:
            out["dc_upper"], out["dc_lower"] = dc_upper, dc_lower
            out["dc_middle"] = (dc_upper + dc_lower) / 2.0
        if i >= lb["volatility"]:
            out["volatility"] = self.rets.std()
        if i >= lb["vwap"]:
            out["vwap"] = self.pv.total / self.vol.total if self.traded_count else close
        if i >= lb["trend"]:
            a = atr
            out["trend"] = (self.emas[-1] - self.emas[0]) / (p.trend_lookback * a) if a > 0 else 0.0
        if i >= lb["bb_width_z"]:
            sd = self.widths.std()
            out["bb_width_z"] = (out["bb_width"] - self.widths.mean) / sd if sd > 0 else 0.0
        return out


class SignalEngine:
    """Incremental indicators and regimes for any number of (symbol, interval) series."""

    def __init__(
        self,
        params: SignalParams | None = None,
        *,
        base: str = "1m",
        higher: tuple[str, ...] = (),
    ) -> None:
        self.params = params or SignalParams()
        self.base = base
        self.higher = tuple(higher)
        for interval in self.higher:
            ratio(base, interval)  # validates
        self._series: dict[tuple[str, str], _Series] = {}
        self._aggs: dict[str, tuple[CandleAggregator, ...]] = {}

    @property
    def warmup(self) -> int:
        """Candles a series needs before its first signal."""
        return self.params.warmup

    def base_candles_needed(self) -> int:
        """Base candles that warm up every interval (a first bucket may be partial)."""
        need = self.warmup
        for interval in self.higher:
            need = max(need, (self.warmup + 1) * ratio(self.base, interval))
        return need

    def seen(self, symbol: str, interval: str) -> int:
        """How many candles of this series were taken (duplicates excluded)."""
        s = self._series.get((symbol, interval))
        return 0 if s is None else s.count

    def last_open_time(self, symbol: str, interval: str) -> int | None:
        """Open time (ms) of the newest candle taken for this series, if any."""
        s = self._series.get((symbol, interval))
        return None if s is None or s.count == 0 else s.last_open_time

    def incomplete_buckets(self, symbol: str) -> int:
        """Higher-interval buckets of ``symbol`` dropped because a base candle was missing."""
        return sum(a.incomplete for a in self._aggs.get(symbol, ()))

    def forget(self, symbol: str) -> None:
        """Drop every series of ``symbol`` (another replica handles it now)."""
        for key in [k for k in self._series if k[0] == symbol]:
            del self._series[key]
        self._aggs.pop(symbol, None)

    def _get(self, key: tuple[str, str]) -> _Series:
        s = self._series.get(key)
        if s is None:
            s = self._series[key] = _Series(self.params)
        return s

    def on_candle(self, candle: Candle) -> list[Signal]:
        """Take one closed candle; returns the signals it completes (none while warming up)."""
        out: list[Signal] = []
        if not self._take(candle, out):
            return out
        if candle.interval == self.base and self.higher:
            aggs = self._aggs.get(candle.symbol)
            if aggs is None:
                aggs = self._aggs[candle.symbol] = tuple(
                    CandleAggregator(candle.symbol, iv, self.base) for iv in self.higher
                )
            for agg in aggs:
                built = agg.add(candle)
                if built is not None:
                    self._take(built, out)
        return out

    def _take(self, candle: Candle, out: list[Signal]) -> bool:
        s = self._get((candle.symbol, candle.interval))
        if candle.open_time <= s.last_open_time:
            return False
        s.last_open_time = candle.open_time
        close = float(candle.close)
        values = s.update(float(candle.high), float(candle.low), close, float(candle.volume))
        i = s.count - 1
        if i < self.params.regime_lookback:
            regime: Regime = "warmup"
        else:
            regime = s.regime.step(
                values["adx"], values["plus_di"], values["minus_di"], values["bb_width_z"]
            )
        if s.count < self.warmup:
            return True
        out.append(make_signal(candle, values, regime))
        return True
