"""Indicators against TA-Lib (reference implementation) on real Binance candles.

TA-Lib is a dev dependency for these tests only. Checked after each indicator's warm-up:
values within 1e-9 (absolute) and the same warm-up (TA-Lib's lookback: NaN before it, ours
null). VWAP, which TA-Lib lacks, is checked against a plain per-row reference.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import numpy as np
import polars as pl
import pytest
import talib
from signals_factories import PAIRS, SMALL, candles, engine_signals, frame

from gridstream.core.signals.engine import INDICATORS, SignalParams
from gridstream.core.signals.frame import compute_frame
from gridstream.core.signals.indicators import MonotonicExtreme, RollingStats, RollingSum

TOL = 1e-9
OTHER = SignalParams(
    sma_period=50,
    ema_period=9,
    rsi_period=7,
    atr_period=21,
    bb_period=30,
    bb_k=2.5,
    adx_period=10,
    donchian_period=55,
    vol_window=30,
    vwap_window=15,
)


def talib_reference(df: pl.DataFrame, p: SignalParams) -> dict[str, np.ndarray]:
    h, lo, c = (df[x].to_numpy().astype(np.float64) for x in ("high", "low", "close"))
    upper, middle, lower = talib.BBANDS(c, p.bb_period, p.bb_k, p.bb_k, 0)
    rets = np.full(len(c), np.nan)
    rets[1:] = np.log(c[1:] / c[:-1])
    dc_upper, dc_lower = talib.MAX(h, p.donchian_period), talib.MIN(lo, p.donchian_period)
    return {
        "sma": talib.SMA(c, p.sma_period),
        "ema": talib.EMA(c, p.ema_period),
        "rsi": talib.RSI(c, p.rsi_period),
        "atr": talib.ATR(h, lo, c, p.atr_period),
        "bb_upper": upper,
        "bb_middle": middle,
        "bb_lower": lower,
        "bb_width": (upper - lower) / middle,
        "plus_di": talib.PLUS_DI(h, lo, c, p.adx_period),
        "minus_di": talib.MINUS_DI(h, lo, c, p.adx_period),
        "adx": talib.ADX(h, lo, c, p.adx_period),
        "dc_upper": dc_upper,
        "dc_lower": dc_lower,
        "dc_middle": (dc_upper + dc_lower) / 2,
        "volatility": talib.STDDEV(rets, p.vol_window, 1.0),
    }


def vwap_reference(df: pl.DataFrame, n: int) -> list[float]:
    out = [math.nan] * df.height
    rows = df.select("high", "low", "close", "volume").rows()
    for i in range(n - 1, len(rows)):
        window = rows[i - n + 1 : i + 1]
        vol = math.fsum(r[3] for r in window)
        pv = math.fsum((r[0] + r[1] + r[2]) / 3 * r[3] for r in window)
        out[i] = pv / vol if vol > 0 else rows[i][2]
    return out


def max_diffs(ours: pl.DataFrame, ref: dict[str, np.ndarray]) -> dict[str, float]:
    """Max |ours - ref| per column, after asserting both start at the same row."""
    worst: dict[str, float] = {}
    for name, want in ref.items():
        got = ours[name].to_numpy().astype(np.float64)
        assert np.array_equal(np.isnan(got), np.isnan(want)), f"{name}: warm-up differs"
        defined = ~np.isnan(want)
        assert defined.any(), name
        worst[name] = float(np.max(np.abs(got[defined] - want[defined])))
    return worst


@pytest.mark.parametrize("params", [SignalParams(), OTHER], ids=["default", "other"])
@pytest.mark.parametrize("symbol", PAIRS)
def test_batch_matches_talib_on_real_1m_candles(symbol: str, params: SignalParams) -> None:
    df = frame(symbol)
    ours = compute_frame(df, params)
    worst = max_diffs(ours, talib_reference(df, params))
    assert max(worst.values()) <= TOL, worst


@pytest.mark.parametrize(
    ("symbol", "interval", "suffix"),
    [
        ("BTCUSDT", "5m", ""),
        ("XRPUSDT", "5m", ""),
        ("ETHUSDT", "15m", "-20250520"),
        ("SOLUSDT", "1h", ""),
    ],
)
def test_batch_matches_talib_on_higher_intervals(symbol: str, interval: str, suffix: str) -> None:
    df = frame(symbol, interval, suffix=suffix)
    p = SignalParams(regime_window=20) if df.height < 300 else SignalParams()
    worst = max_diffs(compute_frame(df, p), talib_reference(df, p))
    assert max(worst.values()) <= TOL, worst


def test_engine_matches_talib_candle_by_candle() -> None:
    df = frame("SOLUSDT", n=3000)
    ref = talib_reference(df, OTHER)
    sigs = engine_signals(candles("SOLUSDT", n=3000), OTHER)
    first = 3000 - len(sigs)
    assert first == OTHER.warmup - 1
    for name, want in ref.items():
        got = np.array([s.values[name] for s in sigs])
        assert np.max(np.abs(got - want[first:])) <= TOL, name


@pytest.mark.parametrize("symbol", ["BTCUSDT", "XRPUSDT"])
def test_vwap_is_the_rolling_volume_weighted_typical_price(symbol: str) -> None:
    df = frame(symbol, n=5000)
    for n in (1, 60):
        p = SignalParams(vwap_window=n)
        got = compute_frame(df, p)["vwap"].to_list()
        want = vwap_reference(df, n)
        assert all(g is None for g in got[: n - 1])
        assert max(abs(g - w) for g, w in zip(got[n - 1 :], want[n - 1 :], strict=True)) <= TOL


def test_vwap_of_a_window_without_volume_is_the_close() -> None:
    df = frame("BTCUSDT", n=200).with_columns(
        pl.when(pl.int_range(pl.len()).is_between(100, 110))
        .then(0.0)
        .otherwise(pl.col("volume"))
        .alias("volume")
    )
    p = SignalParams(vwap_window=5)
    out = compute_frame(df, p)
    assert out["vwap"][110] == out["close"][110]
    assert out["vwap"][111] != out["close"][111]
    sigs = engine_signals([c for c in candles("BTCUSDT", n=200)], SMALL)
    assert all(math.isfinite(s.values["vwap"]) for s in sigs)


def test_lookbacks_equal_talibs() -> None:
    p = SignalParams()
    lb = p.lookbacks()
    from talib import abstract

    checks: dict[str, tuple[str, dict[str, int]]] = {
        "sma": ("SMA", {"timeperiod": p.sma_period}),
        "ema": ("EMA", {"timeperiod": p.ema_period}),
        "rsi": ("RSI", {"timeperiod": p.rsi_period}),
        "atr": ("ATR", {"timeperiod": p.atr_period}),
        "bb_upper": ("BBANDS", {"timeperiod": p.bb_period}),
        "plus_di": ("PLUS_DI", {"timeperiod": p.adx_period}),
        "adx": ("ADX", {"timeperiod": p.adx_period}),
        "dc_upper": ("MAX", {"timeperiod": p.donchian_period}),
    }
    for name, (fn, kwargs) in checks.items():
        f = abstract.Function(fn)
        f.parameters = kwargs
        assert f.lookback == lb[name], name
    assert set(lb) == set(INDICATORS)
    assert p.warmup == max(lb.values()) + 1


@pytest.mark.parametrize(
    ("make", "brute"),
    [
        (lambda n: RollingStats(n), lambda w: (math.fsum(w) / len(w), float(np.std(w)))),
        (lambda n: RollingSum(n), lambda w: (math.fsum(w),)),
        (lambda n: MonotonicExtreme(n, maximum=True), lambda w: (max(w),)),
        (lambda n: MonotonicExtreme(n, maximum=False), lambda w: (min(w),)),
    ],
    ids=["stats", "sum", "max", "min"],
)
def test_rolling_primitives_equal_a_brute_force_window(
    make: Callable[[int], object], brute: Callable[[list[float]], tuple[float, ...]]
) -> None:
    rng = random.Random(3)
    xs = [70_000 + rng.gauss(0, 50) + (500 if i % 97 == 0 else 0) for i in range(3000)]
    for n in (1, 2, 7, 50):
        ind = make(n)
        for i, x in enumerate(xs):
            got: tuple[float, ...]
            if isinstance(ind, RollingStats):
                ind.push(x)
                got = (ind.mean, ind.std())
            elif isinstance(ind, RollingSum):
                ind.push(x)
                got = (ind.total,)
            else:
                assert isinstance(ind, MonotonicExtreme)
                got = (ind.push(x),)
            window = xs[max(0, i - n + 1) : i + 1]
            if len(window) == n:
                # a std far below the values' scale can only be as exact as the values:
                # ~1e-14 of their magnitude (here 70,000 -> 7e-10)
                scale = (1e-9, 1e-14 * max(window))
                for k, (g, w) in enumerate(zip(got, brute(window), strict=True)):
                    assert abs(g - w) <= max(1e-9 * abs(w), scale[k]), (n, i)
