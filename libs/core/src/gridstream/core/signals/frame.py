"""The signals engine's indicators over a whole candle history, with Polars expressions.

Same definitions as :mod:`gridstream.core.signals.indicators` (TA-Lib seeding included). One lazy
Polars query computes every column (Polars runs its independent expressions in parallel). A
Wilder or EMA series is an ``ewm_mean(adjust=False)`` over a null-free body whose first row
is its seed (an SMA at the first defined index), preceded by nulls, so it starts exactly as
the incremental engine does. Every expression looks only backwards (rolling windows,
``shift`` by positive amounts, causal EWM), so no row sees the future: the values of row
``i`` equal what the engine emits for that candle.

The regime's hysteresis is a state machine (each step depends on the state and on how long
it has lasted), which no vectorised expression computes: a small compiled loop (numba),
called through ``map_batches``, transcribes the engine's
:class:`~gridstream.core.signals.engine.RegimeTracker` step for step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, cast, get_args

import numpy as np
import numpy.typing as npt
import polars as pl
from numba import njit
from polars._typing import EngineType

from gridstream.common.messages import Regime
from gridstream.core.signals.engine import INDICATORS, SignalParams
from gridstream.core.signals.indicators import TA_EPSILON

#: Columns added by :func:`compute_frame`.
OUTPUT_COLUMNS = (*INDICATORS, "warm", "regime")
_KEYS = ("symbol", "interval")
#: Polars engine that runs the indicator query: the streaming engine (Polars' default) is
#: the faster one here.
ENGINE: EngineType = "streaming"

Floats = npt.NDArray[np.float64]

#: Regime codes of the state machine; code ``i`` is ``REGIMES[i]``.
REGIMES: Final[tuple[Regime, ...]] = get_args(Regime)
_WARMUP, _RANGE, _UP, _DOWN, _HIGH_VOL = (
    REGIMES.index(r) for r in ("warmup", "range", "trend_up", "trend_down", "high_volatility")
)


def _regime_steps(
    adx: Floats,
    plus_di: Floats,
    minus_di: Floats,
    width_z: Floats,
    first: int,
    thresholds: Floats,
    min_dwell: int,
    codes: npt.NDArray[np.int8],
) -> npt.NDArray[np.int8]:
    """:meth:`RegimeTracker.step <gridstream.core.signals.engine.RegimeTracker.step>` over the
    inputs of rows ``first..`` (index 0 = row ``first``); rows before are ``warmup``.
    ``codes`` = (warmup, range, trend_up, trend_down, high_volatility)."""
    adx_enter, adx_exit, vol_enter, vol_exit = (
        thresholds[0],
        thresholds[1],
        thresholds[2],
        thresholds[3],
    )
    warmup, rng, up, down, high_vol = codes[0], codes[1], codes[2], codes[3], codes[4]
    out = np.full(first + adx.shape[0], warmup, dtype=np.int8)
    state = rng
    dwell = min_dwell
    for j in range(adx.shape[0]):
        i = j + first
        a = adx[j]
        if width_z[j] > (vol_exit if state == high_vol else vol_enter):
            want = high_vol
        elif a > adx_enter or ((state == up or state == down) and a >= adx_exit):  # noqa: SIM109 (kept as plain comparisons for numba)
            want = up if plus_di[j] > minus_di[j] else down
        else:
            want = rng
        if want != state and (want == high_vol or dwell >= min_dwell):
            state = want
            dwell = 1
        else:
            dwell += 1
        out[i] = state
    return out


#: :func:`_regime_steps` compiled (on first use; cached on disk by numba).
_regime_kernel = cast(
    "Callable[..., npt.NDArray[np.int8]]", njit(cache=True, nogil=True)(_regime_steps)
)


def _floats(s: pl.Series) -> Floats:
    """A float column as a numpy array, nulls as NaN (no copy when it has neither)."""
    return s.to_numpy()


def _pad(body: pl.Expr, k: int, height: int) -> pl.Expr:
    """``k`` nulls, then ``body`` (the ``height - k`` rows from row ``k``); all nulls when the
    series has no row ``k``. Appending a null prefix is almost free (a new chunk, no copy)."""
    if k >= height:
        return pl.repeat(None, height, dtype=pl.Float64)
    if k == 0:
        return body
    return pl.repeat(None, k, dtype=pl.Float64).append(body)


def _seeded_ewm(values: pl.Expr, seed: pl.Expr, first: int, alpha: float, height: int) -> pl.Expr:
    """EWM (adjust=False) that is ``seed`` at row ``first`` and follows ``values`` after it;
    null before. The EWM runs over a null-free body (its fast path)."""
    body = seed.append(values.slice(first + 1)).ewm_mean(alpha=alpha, adjust=False)
    return _pad(body, first, height)


def indicator_frame(
    df: pl.DataFrame, params: SignalParams, *, with_regime: bool = True
) -> pl.DataFrame:
    """Every indicator column for one series (rows in time order), nulls before warm-up;
    ``warm`` and ``regime`` too unless ``with_regime`` is false."""
    done = indicator_query(df, params).collect(engine=ENGINE)
    if not with_regime:
        return done
    return done.with_columns(
        (pl.int_range(pl.len()) >= params.warmup - 1).alias("warm"), regime_expr(params)
    )


def indicator_query(df: pl.DataFrame, params: SignalParams) -> pl.LazyFrame:
    """The lazy query behind :func:`indicator_frame` (without ``warm`` and ``regime``)."""
    p = params
    lb = p.lookbacks()
    rows = df.height
    # inputs as float64, cast once (and not at all when they already are)
    inputs = {}
    for c in ("high", "low", "close", "volume"):
        if c not in df.columns:
            inputs[c] = pl.lit(0.0)  # no volume: the VWAP is the close
        elif df.schema[c] != pl.Float64:
            inputs[c] = pl.col(c).cast(pl.Float64)
    high, low, close, volume = (
        pl.col(f"_{c}") if c in inputs else pl.col(c) for c in ("high", "low", "close", "volume")
    )
    prev = close.shift(1)

    def pad(body: pl.Expr, k: int) -> pl.Expr:
        return _pad(body, k, rows)

    def seeded_ewm(values: pl.Expr, seed: pl.Expr, first: int, alpha: float) -> pl.Expr:
        return _seeded_ewm(values, seed, first, alpha, rows)

    # True range, directional movement, gains and losses are read
    # from row 1 on (row 0 has no previous candle; its values are never read).
    dp = high - high.shift(1)
    dm = low.shift(1) - low
    change = close - prev
    n_rsi, n_atr, n_adx = p.rsi_period, p.atr_period, p.adx_period
    base = df.lazy()
    if inputs:
        base = base.with_columns(e.alias(f"_{c}") for c, e in inputs.items())
    base = base.with_columns(
        pl.max_horizontal(high - low, (prev - high).abs(), (low - prev).abs()).alias("_tr"),
        pl.when((dp > 0) & (dp > dm)).then(dp).otherwise(0.0).alias("_pdm"),
        pl.when((dm > 0) & (dp < dm)).then(dm).otherwise(0.0).alias("_mdm"),
        change.clip(lower_bound=0.0).alias("_gain"),
        (-change).clip(lower_bound=0.0).alias("_loss"),
        (close / prev).log().alias("_ret"),
        ((high + low + close) / 3.0 * volume).alias("_pv"),
        (volume > 0).cast(pl.Int32).alias("_traded"),
    )

    def wilder(col: str, n: int) -> pl.Expr:
        # seed at row n: the mean of rows 1..n
        c = pl.col(col)
        return seeded_ewm(c, c.slice(1, n).sum() / n, n, 1.0 / n)

    def dm_smooth(col: str) -> pl.Expr:
        # TA-Lib's s = s - s/n + x, seeded at row n-1 with the sum of rows 1..n-1; carried
        # as s/n, from row n (the DIs' lookback).
        c = pl.col(col)
        seed = c.slice(1, n_adx - 1).sum() / n_adx
        body = seed.append(c.slice(n_adx)).ewm_mean(alpha=1.0 / n_adx, adjust=False)
        return pad(body.slice(1), n_adx)

    # Rolling windows over null-free inputs: nulls before the first full window, which is
    # each one's lookback; no ``when`` masks needed.
    # Polars does not share equal rolling expressions between columns: the Bollinger mean
    # and std are computed once, as columns (the SMA too when its period is the same).
    base = base.with_columns(
        close.rolling_mean(window_size=p.bb_period).alias("bb_middle"),
        close.rolling_std(window_size=p.bb_period, ddof=0).alias("_bb_sd"),
    )
    bb_mid, bb_std = pl.col("bb_middle"), pl.col("_bb_sd")
    sma = bb_mid if p.sma_period == p.bb_period else close.rolling_mean(p.sma_period)
    ema_p = p.ema_period
    vw = p.vwap_window
    out = base.with_columns(
        sma.alias("sma"),
        seeded_ewm(close, close.slice(0, ema_p).sum() / ema_p, ema_p - 1, 2.0 / (ema_p + 1)).alias(
            "ema"
        ),
        wilder("_gain", n_rsi).alias("_avg_gain"),
        wilder("_loss", n_rsi).alias("_avg_loss"),
        wilder("_tr", n_atr).alias("atr"),
        (bb_mid + p.bb_k * bb_std).alias("bb_upper"),
        (bb_mid - p.bb_k * bb_std).alias("bb_lower"),
        dm_smooth("_pdm").alias("_spdm"),
        dm_smooth("_mdm").alias("_smdm"),
        dm_smooth("_tr").alias("_str"),
        high.rolling_max(window_size=p.donchian_period).alias("dc_upper"),
        low.rolling_min(window_size=p.donchian_period).alias("dc_lower"),
        # returns from row 1: the first full window ends at row vol_window (its lookback)
        pad(pl.col("_ret").slice(1).rolling_std(window_size=p.vol_window, ddof=0), 1).alias(
            "volatility"
        ),
        # a null count (before the first window) leaves the division: null too
        pl.when(pl.col("_traded").rolling_sum(window_size=vw) == 0)
        .then(close)
        .otherwise(pl.col("_pv").rolling_sum(window_size=vw) / volume.rolling_sum(window_size=vw))
        .alias("vwap"),
    )
    g, lo = pl.col("_avg_gain"), pl.col("_avg_loss")
    mid = pl.col("bb_middle")
    # TA_IS_ZERO on sums of non-negative terms (ranges, gains and losses, movements):
    # below the threshold. Null inputs (before a lookback) give nulls.
    str_zero = pl.col("_str") * n_adx < TA_EPSILON
    out = out.with_columns(
        pl.when(g + lo < TA_EPSILON).then(0.0).otherwise(100.0 * (g / (g + lo))).alias("rsi"),
        pl.when(str_zero)
        .then(0.0)
        .otherwise(100.0 * (pl.col("_spdm") / pl.col("_str")))
        .alias("plus_di"),
        pl.when(str_zero)
        .then(0.0)
        .otherwise(100.0 * (pl.col("_smdm") / pl.col("_str")))
        .alias("minus_di"),
        # (upper - lower) / middle, from the one rolling std
        pl.when(mid == 0).then(0.0).otherwise(2.0 * p.bb_k * bb_std / mid).alias("bb_width"),
        ((pl.col("dc_upper") + pl.col("dc_lower")) / 2.0).alias("dc_middle"),
    )
    pdi, mdi = pl.col("plus_di"), pl.col("minus_di")
    ema, atr, k = pl.col("ema"), pl.col("atr"), p.trend_lookback
    bb = lb["bb_width"]
    # the width from its first value: the z-score's first full window ends at its lookback
    width = pl.col("bb_width").slice(bb)
    out = out.with_columns(
        pad(width.rolling_std(window_size=p.regime_window, ddof=0), bb).alias("_w_sd"),
        pad(width.rolling_mean(window_size=p.regime_window), bb).alias("_w_mean"),
    )
    width, width_sd, width_mean = pl.col("bb_width"), pl.col("_w_sd"), pl.col("_w_mean")
    out = out.with_columns(
        pl.when(pdi + mdi < TA_EPSILON)
        .then(None)
        .otherwise(100.0 * ((mdi - pdi).abs() / (pdi + mdi)))
        .alias("_dx"),
        # nulls until both the EMA k candles back and the ATR exist: the trend's lookback
        pl.when(atr <= 0).then(0.0).otherwise((ema - ema.shift(k)) / (k * atr)).alias("trend"),
        pl.when(width_sd <= 0)
        .then(0.0)
        .otherwise((width - width_mean) / width_sd)
        .alias("bb_width_z"),
    )
    first_adx = lb["adx"]
    dxc = pl.col("_dx")
    adx_seed = dxc.slice(n_adx, n_adx).fill_null(0.0).sum() / n_adx
    adx_body = (
        adx_seed.append(dxc.slice(first_adx + 1))
        .ewm_mean(alpha=1.0 / n_adx, adjust=False, ignore_nulls=True)
        .forward_fill()
    )
    return out.with_columns(pad(adx_body, first_adx).alias("adx")).select(pl.exclude("^_.*$"))


def regime_expr(params: SignalParams) -> pl.Expr:
    """The ``regime`` column over the indicator columns (``warmup`` before the rule's inputs
    are all defined): the engine's hysteresis rule, one compiled pass."""
    p = params
    thresholds = np.array([p.adx_enter, p.adx_exit, p.vol_enter_z, p.vol_exit_z])
    codes = np.array([_WARMUP, _RANGE, _UP, _DOWN, _HIGH_VOL], dtype=np.int8)

    def run(s: pl.Series) -> pl.Series:
        first = min(p.regime_lookback, s.len())
        cols = s.struct.unnest().slice(first)
        got = _regime_kernel(
            *(_floats(cols[c]) for c in ("adx", "plus_di", "minus_di", "bb_width_z")),
            first,
            thresholds,
            p.min_dwell,
            codes,
        )
        return pl.Series("regime", got)

    names = pl.lit(pl.Series(REGIMES, dtype=pl.String))
    code = pl.struct("adx", "plus_di", "minus_di", "bb_width_z").map_batches(
        run, return_dtype=pl.Int8
    )
    return names.gather(code).alias("regime")


def regimes(frame: pl.DataFrame, params: SignalParams) -> list[Regime]:
    """The regime of every row of an indicator frame (see :func:`regime_expr`)."""
    got: list[Regime] = frame.select(regime_expr(params)).to_series().to_list()
    return got


def compute_frame(df: pl.DataFrame, params: SignalParams | None = None) -> pl.DataFrame:
    """Indicators and regime for every candle of ``df``.

    ``df`` needs ``open_time``, ``high``, ``low``, ``close`` and ``volume`` (numbers or
    decimals; without ``volume`` the VWAP is the close); with ``symbol`` (and ``interval``)
    columns each series is computed on its own. Rows are sorted by open time and duplicate
    open times dropped (the first kept), as the engine does for a history fed in order. Adds
    :data:`OUTPUT_COLUMNS`: each indicator is null before its own warm-up; ``warm`` is true
    from the row where the engine emits its first signal; ``regime`` is ``warmup`` until the
    rule's inputs exist.
    """
    params = params or SignalParams()
    keys = [c for c in _KEYS if c in df.columns]
    if not keys:
        data = df.sort("open_time", maintain_order=True).unique(
            subset=["open_time"], keep="first", maintain_order=True
        )
        return indicator_frame(data, params)
    data = df.sort([*keys, "open_time"], maintain_order=True).unique(
        subset=[*keys, "open_time"], keep="first", maintain_order=True
    )
    parts = [indicator_frame(part, params) for part in data.partition_by(keys, maintain_order=True)]
    if not parts:
        return indicator_frame(data, params)
    return pl.concat(parts)
