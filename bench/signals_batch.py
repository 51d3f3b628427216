"""Batch indicators over 1M candles: gridstream's Polars path vs TA-Lib, same run.

What: every indicator of the signals service (SMA, EMA, RSI, ATR, Bollinger + width, +DI,
-DI, ADX, Donchian, realised volatility, VWAP, EMA trend, width z-score) over 1,000,000 1m
candles (real BTCUSDT candles from data/klines tiled end to end) with
``gridstream.core.signals.frame.indicator_frame``. Reference: the same indicators with TA-Lib
(SMA, EMA, RSI, ATR, BBANDS, PLUS_DI, MINUS_DI, ADX, MAX, MIN, STDDEV) plus numpy for the
three TA-Lib lacks (VWAP, trend, z-score), inputs already numpy arrays. Best of N runs each.
The regime's state machine (a compiled numba loop called through Polars, not an indicator)
is timed on its own, after a warm-up call that compiles it.
Target: Polars within 2x of TA-Lib.

    uv run python bench/signals_batch.py [--rows 1000000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import talib

from gridstream.core.signals.engine import SignalParams
from gridstream.core.signals.frame import indicator_frame, regime_expr

DATA = Path(__file__).resolve().parents[1] / "data" / "klines" / "BTCUSDT-1m.csv.gz"


def candles(rows: int) -> pl.DataFrame:
    one = (
        pl.read_csv(DATA)
        .select("open", "high", "low", "close", "volume")
        .with_columns(pl.all().cast(pl.Float64))
    )
    reps = -(-rows // one.height)
    df = pl.concat([one] * reps).head(rows)
    # one contiguous chunk per column, as a file read gives (and as TA-Lib's arrays are)
    return df.with_columns(
        (pl.int_range(pl.len(), dtype=pl.Int64) * 60_000 + 1_700_000_000_000).alias("open_time")
    ).rechunk()


def rolling_sum(x: np.ndarray, n: int) -> np.ndarray:
    c = np.cumsum(np.concatenate(([0.0], x)))
    out = np.full(len(x), np.nan)
    out[n - 1 :] = c[n:] - c[:-n]
    return out


def talib_all(
    h: np.ndarray, lo: np.ndarray, c: np.ndarray, v: np.ndarray, p: SignalParams
) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    out["sma"] = talib.SMA(c, p.sma_period)
    out["ema"] = talib.EMA(c, p.ema_period)
    out["rsi"] = talib.RSI(c, p.rsi_period)
    out["atr"] = talib.ATR(h, lo, c, p.atr_period)
    up, mid, dn = talib.BBANDS(c, p.bb_period, p.bb_k, p.bb_k, 0)
    out["bb_upper"], out["bb_middle"], out["bb_lower"] = up, mid, dn
    out["bb_width"] = (up - dn) / mid
    out["plus_di"] = talib.PLUS_DI(h, lo, c, p.adx_period)
    out["minus_di"] = talib.MINUS_DI(h, lo, c, p.adx_period)
    out["adx"] = talib.ADX(h, lo, c, p.adx_period)
    out["dc_upper"] = talib.MAX(h, p.donchian_period)
    out["dc_lower"] = talib.MIN(lo, p.donchian_period)
    out["dc_middle"] = (out["dc_upper"] + out["dc_lower"]) / 2
    rets = np.empty(len(c))
    rets[0] = np.nan
    rets[1:] = np.log(c[1:] / c[:-1])
    out["volatility"] = talib.STDDEV(rets, p.vol_window, 1.0)
    tp = (h + lo + c) / 3
    out["vwap"] = rolling_sum(tp * v, p.vwap_window) / rolling_sum(v, p.vwap_window)
    k = p.trend_lookback
    ema = out["ema"]
    trend = np.full(len(c), np.nan)
    trend[k:] = (ema[k:] - ema[:-k]) / (k * out["atr"][k:])
    out["trend"] = trend
    w = out["bb_width"]
    out["bb_width_z"] = (w - talib.SMA(w, p.regime_window)) / talib.STDDEV(w, p.regime_window, 1.0)
    return out


def best(fn, repeat: int) -> tuple[float, object]:  # type: ignore[no-untyped-def]
    times, result = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
    return min(times), result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    p = SignalParams()
    df = candles(args.rows)
    h, lo, c, v = (df[x].to_numpy() for x in ("high", "low", "close", "volume"))
    print(
        f"python {platform.python_version()}, {os.cpu_count()} cores, polars {pl.__version__},"
        f" ta-lib {talib.__version__}; {df.height:,} candles, best of {args.repeat}"
    )
    t_ref, ref = best(lambda: talib_all(h, lo, c, v, p), args.repeat)
    t_ours, ours = best(lambda: indicator_frame(df, p, with_regime=False), args.repeat)
    assert isinstance(ours, pl.DataFrame) and isinstance(ref, dict)
    worst = 0.0
    for name in (
        "sma",
        "ema",
        "rsi",
        "atr",
        "bb_upper",
        "plus_di",
        "adx",
        "dc_upper",
        "volatility",
    ):
        worst = max(worst, float(np.nanmax(np.abs(ours[name].to_numpy() - ref[name]))))
    ours.head(1000).select(regime_expr(p))  # numba compiles (or loads its cache) once
    t_reg, _ = best(lambda: ours.select(regime_expr(p)), args.repeat)
    ratio = t_ours / t_ref
    print(
        f"reference  TA-Lib (+numpy), 18 indicator columns: {t_ref * 1000:9.1f} ms  {df.height / t_ref / 1e6:6.1f} M candles/s"
    )
    print(
        f"gridstream Polars indicator_frame, same columns:   {t_ours * 1000:9.1f} ms  {df.height / t_ours / 1e6:6.1f} M candles/s"
    )
    print(
        f"ratio gridstream/TA-Lib: {ratio:.2f}   target <= 2.0: {'MET' if ratio <= 2.0 else 'MISSED'}"
    )
    print(f"max |diff| vs TA-Lib (sma ema rsi atr bb di adx donchian vol): {worst:.2e}")
    print(f"regime state machine over the same rows (numba via Polars): {t_reg * 1000:.1f} ms")
    sys.exit(0)


if __name__ == "__main__":
    main()
