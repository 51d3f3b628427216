"""The signal engine's signals for whole series known in advance (a backtest), made at once.

:class:`BatchSignals` answers ``on_candle`` as :class:`~gridstream.core.signals.engine.
SignalEngine` does, one base-interval series per symbol, but from columns computed before
the run: the indicators with the Polars query of :mod:`gridstream.core.signals.frame` (one
pass per series), the regime with its compiled transcription of
:class:`~gridstream.core.signals.engine.RegimeTracker`.

What a strategy decides on equals the engine's to the last bit, not just within 1e-9:

* ``ema``: the Polars EWM is the engine's recursion (bit-equal; a test holds it);
* ``atr``: the engine's own :class:`~gridstream.core.signals.indicators.Wilder` over the
  engine's own :func:`~gridstream.core.signals.indicators.true_range`, one pass;
* ``regime``: the batch rule's inputs (ADX, +DI, -DI, the width's z-score) differ from
  the engine's by rounding only (~1e-13 here). Where one of them is within
  :data:`REGIME_GUARD` of a threshold of the rule (or +DI of -DI), rounding could flip a
  comparison: that series is then computed by the engine itself, candle by candle
  (exact, slower). Otherwise every comparison, so every regime, is the engine's.

The other values (``Signal.values``, ``volatility``, ``trend``) are the batch query's,
within 1e-9 of the engine's (the signals tests). Higher intervals are not built here: a
run that needs them uses the engine.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Protocol, get_args

import numpy as np
import numpy.typing as npt
import polars as pl

from gridstream.common.messages import Candle, Regime, Signal
from gridstream.core.signals.engine import INDICATORS, SignalEngine, SignalParams, make_signal
from gridstream.core.signals.indicators import Wilder, true_range

if TYPE_CHECKING:
    from gridstream.core.backtest import Bars

#: How near a threshold a batch regime input may come before its series is computed by
#: the engine instead (far above the ~1e-13 the two differ by).
REGIME_GUARD: Final = 1e-7

Floats = npt.NDArray[np.float64]

#: Every regime in a fixed order: :attr:`SignalColumns.regime` holds indices into it.
REGIMES: Final[tuple[Regime, ...]] = get_args(Regime)


class SignalSource(Protocol):
    """What a backtest asks of its signals: the signals one closed candle completes."""

    def on_candle(self, candle: Candle) -> list[Signal]: ...


@dataclass(frozen=True)
class SeriesColumns:
    """One symbol's base candles as float columns, in time order."""

    open_time: npt.NDArray[np.int64]
    high: Floats
    low: Floats
    close: Floats
    volume: Floats

    @classmethod
    def of_bars(cls, bars: Bars) -> SeriesColumns:
        """The float columns of a backtest's bars (each text parsed once)."""
        return cls(
            open_time=bars.open_time,
            high=np.asarray(bars.high, dtype=np.float64),
            low=np.asarray(bars.low, dtype=np.float64),
            close=np.asarray(bars.close, dtype=np.float64),
            volume=np.asarray(bars.volume, dtype=np.float64),
        )


@dataclass(frozen=True)
class SignalColumns:
    """What a strategy decides on, for every candle of one series, as columns: row ``i``
    is the signal of candle ``i`` (``has_signal[i]`` False while warming up)."""

    has_signal: npt.NDArray[np.bool_]
    ema: Floats
    atr: Floats
    #: indices into :data:`REGIMES`
    regime: npt.NDArray[np.int8]


@dataclass
class _Rows:
    open_time: list[int]
    #: one row per candle, one column per name of ``INDICATORS`` (a matrix: a tuple of
    #: Python floats per candle took ~4x the memory)
    values: Floats
    regime: list[Regime]
    #: index of the next candle expected
    pos: int = 0


def exact_atr(high: Floats, low: Floats, close: Floats, period: int) -> Floats:
    """The engine's ATR of every row (NaN before its lookback): its own classes."""
    out = np.full(len(close), math.nan)
    w = Wilder(period)
    h, lo, c = high.tolist(), low.tolist(), close.tolist()
    for i in range(1, len(c)):
        out[i] = w.push(true_range(h[i], lo[i], c[i - 1]))
    out[:period] = math.nan
    return out


def regime_is_certain(frame: pl.DataFrame, params: SignalParams) -> bool:
    """True when no regime input of ``frame`` is within :data:`REGIME_GUARD` of a
    threshold of the rule, so rounding cannot change a regime."""
    first = params.regime_lookback
    if frame.height <= first:
        return True
    cols = frame.slice(first).select("adx", "plus_di", "minus_di", "bb_width_z")
    adx, pdi, mdi, wz = (cols[c].to_numpy() for c in cols.columns)
    g = REGIME_GUARD
    near = (
        (np.abs(adx - params.adx_enter) < g)
        | (np.abs(adx - params.adx_exit) < g)
        | (np.abs(wz - params.vol_enter_z) < g)
        | (np.abs(wz - params.vol_exit_z) < g)
        | (np.abs(pdi - mdi) < g)
    )
    return not bool(near.any())


class BatchSignals:
    """Signals of known series, made before the run; ``on_candle`` as the engine's."""

    def __init__(
        self,
        series: Mapping[str, SeriesColumns],
        params: SignalParams | None = None,
        *,
        interval: str = "1m",
    ) -> None:
        self.params = params or SignalParams()
        self.interval = interval
        self._warmup = self.params.warmup
        #: symbols whose regime inputs came near a threshold: computed by the engine
        self.by_engine: list[str] = []
        self._rows = {s: self._compute(s, cols) for s, cols in series.items()}
        self._columns: dict[str, SignalColumns] = {}

    @property
    def warmup(self) -> int:
        return self._warmup

    def _compute(self, symbol: str, cols: SeriesColumns) -> _Rows:
        p = self.params
        df = pl.DataFrame(
            {
                "open_time": cols.open_time,
                "high": cols.high,
                "low": cols.low,
                "close": cols.close,
                "volume": cols.volume,
            }
        )
        # imported here: the frame module compiles with numba, a second of start-up that a
        # run without signals (sma-cross) need not pay
        from gridstream.core.signals.frame import indicator_frame

        frame = indicator_frame(df, p)
        if not regime_is_certain(frame, p):
            self.by_engine.append(symbol)
            return self._by_engine(symbol, cols)
        frame = frame.with_columns(
            pl.Series("atr", exact_atr(cols.high, cols.low, cols.close, p.atr_period))
        )
        values = np.ascontiguousarray(
            np.column_stack(
                [frame[k].fill_null(math.nan).to_numpy().astype(np.float64) for k in INDICATORS]
            )
        )
        return _Rows(cols.open_time.tolist(), values, frame["regime"].to_list())

    def _by_engine(self, symbol: str, cols: SeriesColumns) -> _Rows:
        """The same rows from the engine itself, candle by candle (exact)."""
        from decimal import Decimal

        engine = SignalEngine(self.params, base=self.interval)
        times = cols.open_time.tolist()
        values: list[tuple[float, ...]] = []
        regimes: list[Regime] = []
        nan = (math.nan,) * len(INDICATORS)
        zero = Decimal(0)
        for i, t in enumerate(times):
            # the engine reads the floats of the candle's prices: give it those floats
            c = Candle(
                id="",
                ts_event=0,
                ts_init=0,
                symbol=symbol,
                interval=self.interval,
                open_time=t,
                close_time=t,
                open=zero,
                high=Decimal(float(cols.high[i])),
                low=Decimal(float(cols.low[i])),
                close=Decimal(float(cols.close[i])),
                volume=Decimal(float(cols.volume[i])),
            )
            got = engine.on_candle(c)
            if got:
                values.append(tuple(got[0].values[k] for k in INDICATORS))
                regimes.append(got[0].regime)
            else:
                values.append(nan)
                regimes.append("warmup")
        matrix = np.asarray(values, dtype=np.float64).reshape(len(values), len(INDICATORS))
        return _Rows(times, matrix, regimes)

    def columns(self, symbol: str) -> SignalColumns:
        """The signals of ``symbol`` as columns (made once)."""
        got = self._columns.get(symbol)
        if got is None:
            rows = self._rows[symbol]
            n = len(rows.open_time)
            k_ema, k_atr = INDICATORS.index("ema"), INDICATORS.index("atr")
            code = {r: k for k, r in enumerate(REGIMES)}
            has = np.zeros(n, dtype=np.bool_)
            has[max(self._warmup - 1, 0) :] = True
            got = self._columns[symbol] = SignalColumns(
                has_signal=has,
                ema=rows.values[:, k_ema].copy(),
                atr=rows.values[:, k_atr].copy(),
                regime=np.asarray([code[r] for r in rows.regime], dtype=np.int8),
            )
        return got

    def signal_at(self, candle: Candle, i: int) -> list[Signal]:
        """The signal of ``candle``, row ``i`` of its series, out of sequence (a run that
        skips candles): what ``on_candle`` gives for it in sequence."""
        rows = self._rows.get(candle.symbol)
        if rows is None or candle.interval != self.interval:
            raise ValueError(f"no batch signals for {candle.symbol} {candle.interval}")
        if not 0 <= i < len(rows.open_time) or rows.open_time[i] != candle.open_time:
            raise ValueError(f"{candle.symbol} {candle.open_time}: not row {i} of its series")
        if i + 1 < self._warmup:
            return []
        values = dict(zip(INDICATORS, rows.values[i].tolist(), strict=True))
        return [make_signal(candle, values, rows.regime[i])]

    def on_candle_values(self, symbol: str, i: int) -> dict[str, float]:
        """The indicator values of row ``i`` of ``symbol`` (NaN before each warm-up)."""
        return dict(zip(INDICATORS, self._rows[symbol].values[i].tolist(), strict=True))

    def on_candle(self, candle: Candle) -> list[Signal]:
        """The signal of ``candle`` (none while warming up, or for a candle not after the
        last one taken); the candle must be one of the series given."""
        rows = self._rows.get(candle.symbol)
        if rows is None or candle.interval != self.interval:
            raise ValueError(f"no batch signals for {candle.symbol} {candle.interval}")
        i = rows.pos
        times = rows.open_time
        if i and candle.open_time <= times[i - 1]:
            return []  # a duplicate or out of order, as the engine drops it
        if i >= len(times) or times[i] != candle.open_time:
            raise ValueError(f"{candle.symbol} {candle.open_time}: not the next batch candle")
        rows.pos = i + 1
        if i + 1 < self._warmup:
            return []
        values = dict(zip(INDICATORS, rows.values[i].tolist(), strict=True))
        return [make_signal(candle, values, rows.regime[i])]
