"""The signals engine's indicators over a whole candle history, with Polars expressions.

Same definitions as :mod:`gridstream.signals.indicators` (TA-Lib seeding included). A Wilder
or EMA series is an ``ewm_mean(adjust=False)`` whose first row is its seed (an SMA placed at
the first defined index, nulls before it), so it starts exactly as the incremental engine
does. Every expression looks only backwards (rolling windows, ``shift`` by positive amounts,
causal EWM), so no row sees the future: the values of row ``i`` equal what the engine emits
for that candle. The regime's hysteresis is a state machine: it runs once over the finished
indicator columns with the engine's own :class:`~gridstream.signals.engine.RegimeTracker`.
"""

from __future__ import annotations

import polars as pl

from gridstream.common.messages import Regime
from gridstream.signals.engine import INDICATORS, RegimeTracker, SignalParams
from gridstream.signals.indicators import TA_EPSILON

#: Columns added by :func:`compute_frame`.
OUTPUT_COLUMNS = (*INDICATORS, "warm", "regime")
_KEYS = ("symbol", "interval")


def _seeded_ewm(
    values: pl.Expr, index: pl.Expr, seed: pl.Expr, first: int, alpha: float
) -> pl.Expr:
    """EWM (adjust=False) of ``values`` after row ``first``, where it starts from ``seed``."""
    seeded = pl.when(index < first).then(None).when(index == first).then(seed).otherwise(values)
    return seeded.ewm_mean(alpha=alpha, adjust=False, min_samples=1)


def _not_zero(v: pl.Expr) -> pl.Expr:
    return (v <= -TA_EPSILON) | (v >= TA_EPSILON)


def indicator_frame(
    df: pl.DataFrame, params: SignalParams, *, with_regime: bool = True
) -> pl.DataFrame:
    """Every indicator column for one series (rows in time order), nulls before warm-up;
    ``warm`` and ``regime`` too unless ``with_regime`` is false."""
    p = params
    lb = p.lookbacks()
    idx = pl.int_range(pl.len(), dtype=pl.Int64)
    high = pl.col("high").cast(pl.Float64)
    low = pl.col("low").cast(pl.Float64)
    close = pl.col("close").cast(pl.Float64)
    volume = pl.col("volume").cast(pl.Float64) if "volume" in df.columns else pl.lit(0.0)
    prev = close.shift(1)

    def after(name: str, expr: pl.Expr) -> pl.Expr:
        return pl.when(idx >= lb[name]).then(expr).otherwise(None).alias(name)

    # True range, directional movement, gains and losses: defined from row 1.
    tr = pl.max_horizontal(high - low, (prev - high).abs(), (low - prev).abs())
    dp = high - high.shift(1)
    dm = low.shift(1) - low
    plus = pl.when((dp > 0) & (dp > dm)).then(dp).otherwise(0.0)
    minus = pl.when((dm > 0) & (dp < dm)).then(dm).otherwise(0.0)
    change = close - prev
    n_rsi, n_atr, n_adx = p.rsi_period, p.atr_period, p.adx_period
    base = df.lazy().with_columns(
        pl.when(idx >= 1).then(tr).alias("_tr"),
        pl.when(idx >= 1).then(plus).alias("_pdm"),
        pl.when(idx >= 1).then(minus).alias("_mdm"),
        pl.when(idx >= 1).then(change.clip(lower_bound=0.0)).alias("_gain"),
        pl.when(idx >= 1).then((-change).clip(lower_bound=0.0)).alias("_loss"),
        # row 0 has no return: 0.0 there keeps the rolling kernels on their fast no-null
        # path; no window that is read (from row vol_window on) contains row 0
        (close / prev).log().fill_null(0.0).alias("_ret"),
        ((high + low + close) / 3.0 * volume).alias("_pv"),
        volume.alias("_v"),
        (volume > 0).cast(pl.Int64).alias("_traded"),
    )

    def wilder(col: str, n: int) -> pl.Expr:
        # seed at row n: the mean of rows 1..n
        c = pl.col(col)
        return _seeded_ewm(c, idx, c.slice(1, n).sum() / n, n, 1.0 / n)

    def dm_smooth(col: str) -> pl.Expr:
        # TA-Lib's s = s - s/n + x, seeded with the sum of rows 1..n-1; carried as s/n.
        c = pl.col(col)
        return _seeded_ewm(c, idx, c.slice(1, n_adx - 1).sum() / n_adx, n_adx - 1, 1.0 / n_adx)

    bb_std = close.rolling_std(window_size=p.bb_period, ddof=0)
    bb_mid = close.rolling_mean(window_size=p.bb_period)
    ema_p = p.ema_period
    out = base.with_columns(
        close.rolling_mean(window_size=p.sma_period).alias("sma"),
        _seeded_ewm(
            close, idx, close.slice(0, ema_p).sum() / ema_p, ema_p - 1, 2.0 / (ema_p + 1)
        ).alias("ema"),
        wilder("_gain", n_rsi).alias("_avg_gain"),
        wilder("_loss", n_rsi).alias("_avg_loss"),
        wilder("_tr", n_atr).alias("atr"),
        bb_mid.alias("bb_middle"),
        (bb_mid + p.bb_k * bb_std).alias("bb_upper"),
        (bb_mid - p.bb_k * bb_std).alias("bb_lower"),
        dm_smooth("_pdm").alias("_spdm"),
        dm_smooth("_mdm").alias("_smdm"),
        dm_smooth("_tr").alias("_str"),
        high.rolling_max(window_size=p.donchian_period).alias("dc_upper"),
        low.rolling_min(window_size=p.donchian_period).alias("dc_lower"),
        after("volatility", pl.col("_ret").rolling_std(window_size=p.vol_window, ddof=0)),
        after(
            "vwap",
            pl.when(pl.col("_traded").rolling_sum(window_size=p.vwap_window) > 0)
            .then(
                pl.col("_pv").rolling_sum(window_size=p.vwap_window)
                / pl.col("_v").rolling_sum(window_size=p.vwap_window)
            )
            .otherwise(close),
        ),
    )
    g, lo = pl.col("_avg_gain"), pl.col("_avg_loss")
    strn = pl.col("_str") * n_adx
    di_ok = _not_zero(strn)
    mid, up, dn = pl.col("bb_middle"), pl.col("bb_upper"), pl.col("bb_lower")
    out = out.with_columns(
        after("rsi", pl.when(_not_zero(g + lo)).then(100.0 * (g / (g + lo))).otherwise(0.0)),
        after(
            "plus_di",
            pl.when(di_ok).then(100.0 * (pl.col("_spdm") / pl.col("_str"))).otherwise(0.0),
        ),
        after(
            "minus_di",
            pl.when(di_ok).then(100.0 * (pl.col("_smdm") / pl.col("_str"))).otherwise(0.0),
        ),
        after("bb_width", pl.when(mid != 0).then((up - dn) / mid).otherwise(0.0)),
        ((pl.col("dc_upper") + pl.col("dc_lower")) / 2.0).alias("dc_middle"),
    )
    pdi, mdi = pl.col("plus_di"), pl.col("minus_di")
    dx = pl.when(_not_zero(pdi + mdi)).then(100.0 * ((mdi - pdi).abs() / (pdi + mdi)))
    ema, atr, k = pl.col("ema"), pl.col("atr"), p.trend_lookback
    # null before the Bollinger lookback; 0.0 there (fast rolling path) is never in a window
    # that is read: the z-score starts at bb lookback + regime_window - 1
    width = pl.col("bb_width").fill_null(0.0)
    width_sd = width.rolling_std(window_size=p.regime_window, ddof=0)
    out = out.with_columns(
        dx.alias("_dx"),
        after("trend", pl.when(atr > 0).then((ema - ema.shift(k)) / (k * atr)).otherwise(0.0)),
        after(
            "bb_width_z",
            pl.when(width_sd > 0)
            .then((width - width.rolling_mean(window_size=p.regime_window)) / width_sd)
            .otherwise(0.0),
        ),
    )
    first_adx = lb["adx"]
    dxc = pl.col("_dx")
    adx_seed = dxc.slice(n_adx, n_adx).fill_null(0.0).sum() / n_adx
    adx = (
        pl.when(idx < first_adx)
        .then(None)
        .when(idx == first_adx)
        .then(adx_seed)
        .otherwise(dxc)
        .ewm_mean(alpha=1.0 / n_adx, adjust=False, min_samples=1, ignore_nulls=True)
        .forward_fill()
    )
    done = out.with_columns(adx.alias("adx")).select(pl.exclude("^_.*$")).collect()
    if not with_regime:
        return done
    done = done.with_columns((idx >= p.warmup - 1).alias("warm"))
    return done.with_columns(pl.Series("regime", regimes(done, params), dtype=pl.String))


def regimes(frame: pl.DataFrame, params: SignalParams) -> list[Regime]:
    """The regime of every row (``warmup`` before the rule's inputs are all defined)."""
    tracker = RegimeTracker(params)
    first = params.regime_lookback
    out: list[Regime] = ["warmup"] * min(first, frame.height)
    cols = frame.select("adx", "plus_di", "minus_di", "bb_width_z").slice(first)
    step = tracker.step
    for a, pd_, md, z in zip(*(cols[c].to_list() for c in cols.columns), strict=True):
        out.append(step(a, pd_, md, z))
    return out


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
