"""The signals engine's indicators over a whole candle history, with Polars expressions.

Same definitions as :mod:`gridstream.signals.engine` (TA-Lib seeding included): an SMA seed
is placed at the first defined index, with nulls before it, so ``ewm_mean(adjust=False)``
starts from the seed exactly as the incremental engine does. Every expression looks only
backwards (rolling windows, ``shift`` by positive amounts, causal EWM), so no row sees the
future: the value of row ``i`` equals what the engine emits for that candle.
"""

from __future__ import annotations

import polars as pl

from gridstream.signals.engine import SignalParams

#: Columns added by :func:`compute_frame`.
OUTPUT_COLUMNS = ("ema", "atr", "volatility", "trend", "warm", "regime")
_KEYS = ("symbol", "interval")


def _seeded_ewm(values: pl.Expr, index: pl.Expr, period: int, first: int, alpha: float) -> pl.Expr:
    """EWM (adjust=False) whose first value, at row ``first``, is the SMA of ``period`` values."""
    seeded = (
        pl.when(index < first)
        .then(None)
        .when(index == first)
        .then(values.rolling_mean(window_size=period))
        .otherwise(values)
    )
    return seeded.ewm_mean(alpha=alpha, adjust=False, min_samples=1)


def _compute_one(df: pl.DataFrame, params: SignalParams) -> pl.DataFrame:
    p, n, w, k = params.ema_period, params.atr_period, params.vol_window, params.trend_lookback
    idx = pl.int_range(pl.len(), dtype=pl.Int64)
    high = pl.col("high").cast(pl.Float64)
    low = pl.col("low").cast(pl.Float64)
    close = pl.col("close").cast(pl.Float64)
    prev = close.shift(1)
    tr = pl.max_horizontal(high - low, (high - prev).abs(), (low - prev).abs())
    tr = pl.when(idx >= 1).then(tr).otherwise(None)
    out = df.with_columns(
        _seeded_ewm(close, idx, p, p - 1, 2.0 / (p + 1)).alias("ema"),
        _seeded_ewm(tr, idx, n, n, 1.0 / n).alias("atr"),
        (close / prev).log().rolling_std(window_size=w, ddof=0).alias("volatility"),
    )
    ema, atr = pl.col("ema"), pl.col("atr")
    out = out.with_columns(
        pl.when(atr > 0)
        .then((ema - ema.shift(k)) / (k * atr))
        .when(ema.shift(k).is_not_null() & atr.is_not_null())
        .then(0.0)
        .otherwise(None)
        .alias("trend"),
        (idx >= params.warmup - 1).alias("warm"),
    )
    regime = (
        pl.when(~pl.col("warm"))
        .then(pl.lit("warmup"))
        .when((close > 0) & (atr / close > params.high_vol_threshold))
        .then(pl.lit("high_volatility"))
        .when(pl.col("trend") > params.trend_threshold)
        .then(pl.lit("trend_up"))
        .when(pl.col("trend") < -params.trend_threshold)
        .then(pl.lit("trend_down"))
        .otherwise(pl.lit("range"))
    )
    return out.with_columns(regime.alias("regime"))


def compute_frame(df: pl.DataFrame, params: SignalParams | None = None) -> pl.DataFrame:
    """Indicators for every candle of ``df``.

    ``df`` needs ``open_time``, ``high``, ``low``, ``close`` (numbers or decimals); with
    ``symbol`` (and ``interval``) columns each series is computed on its own. Rows are sorted
    by open time and duplicate open times dropped (the first kept), as the engine does for a
    history fed in order. Adds :data:`OUTPUT_COLUMNS`; ``regime`` is ``warmup`` for rows before
    the engine would emit its first signal (``warm`` false).
    """
    params = params or SignalParams()
    keys = [c for c in _KEYS if c in df.columns]
    if not keys:
        data = df.sort("open_time", maintain_order=True).unique(
            subset=["open_time"], keep="first", maintain_order=True
        )
        return _compute_one(data, params)
    data = df.sort([*keys, "open_time"], maintain_order=True).unique(
        subset=[*keys, "open_time"], keep="first", maintain_order=True
    )
    parts = [_compute_one(part, params) for part in data.partition_by(keys, maintain_order=True)]
    if not parts:
        return _compute_one(data, params)
    return pl.concat(parts)
