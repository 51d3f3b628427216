"""SignalEngine: warm-up, values by hand, ids, duplicates, series, regime hysteresis."""

from __future__ import annotations

import math
import random
from decimal import Decimal

import pytest
from signals_factories import SMALL

from gridstream.common import codec
from gridstream.common.messages import Candle, Signal
from gridstream.core.signals.engine import (
    INDICATORS,
    RegimeTracker,
    SignalEngine,
    SignalParams,
    signal_id,
)

MINUTE_MS = 60_000
T0 = 1_774_267_740_000


def candle(
    i: int,
    close: float | str,
    *,
    high: float | str | None = None,
    low: float | str | None = None,
    volume: float | str = 1,
    symbol: str = "BTCUSDT",
    interval: str = "1m",
) -> Candle:
    c = Decimal(str(close))
    h = Decimal(str(high)) if high is not None else c
    lo = Decimal(str(low)) if low is not None else c
    open_time = T0 + i * MINUTE_MS
    return Candle(
        id=f"c{i}",
        ts_event=(open_time + MINUTE_MS) * 1_000_000,
        ts_init=(open_time + MINUTE_MS) * 1_000_000 + 5,
        symbol=symbol,
        interval=interval,
        open_time=open_time,
        close_time=open_time + MINUTE_MS - 1,
        open=c,
        high=h,
        low=lo,
        close=c,
        volume=Decimal(str(volume)),
    )


def random_walk(n: int, seed: int = 1) -> list[tuple[float, float, float, float]]:
    rng = random.Random(seed)
    out, price = [], 100.0
    for _ in range(n):
        price = round(price * math.exp(rng.gauss(0, 0.01)), 2)
        high = round(price + rng.uniform(0, 1), 2)
        low = round(price - rng.uniform(0, 1), 2)
        out.append((high, low, price, round(rng.uniform(0, 5), 3)))
    return out


def test_warmup_is_the_first_index_where_every_indicator_is_defined() -> None:
    # SMALL: bb lookback 4 + regime window 10 - 1 = 13 is the largest -> 14 candles
    assert SMALL.lookbacks()["bb_width_z"] == 13
    assert SMALL.lookbacks()["adx"] == 7
    assert SMALL.warmup == 14
    assert SignalParams().warmup == 259
    assert SignalParams(min_warmup=500).warmup == 500


def test_nothing_is_emitted_before_warmup_then_every_value_is_defined() -> None:
    eng = SignalEngine(SMALL)
    walk = random_walk(40)
    outs = [
        eng.on_candle(candle(i, c, high=h, low=lo, volume=v))
        for i, (h, lo, c, v) in enumerate(walk)
    ]
    assert [len(o) for o in outs] == [0] * 13 + [1] * 27
    for o in outs[13:]:
        sig = o[0]
        assert tuple(sig.values) == INDICATORS
        assert all(math.isfinite(x) for x in sig.values.values())
        assert sig.regime != "warmup"


def test_values_follow_talib_conventions_by_hand() -> None:
    walk = random_walk(60, seed=5)
    highs, lows, closes, vols = (list(x) for x in zip(*walk, strict=True))
    eng = SignalEngine(SMALL)
    sigs = {
        s.open_time: s
        for i, (h, lo, c, v) in enumerate(walk)
        for s in eng.on_candle(candle(i, c, high=h, low=lo, volume=v))
    }
    n = 5
    a = 2 / (n + 1)
    ema = [math.nan] * (n - 1) + [sum(closes[:n]) / n]
    for c in closes[n:]:
        ema.append(ema[-1] + (c - ema[-1]) * a)
    tr = [math.nan] + [
        max(highs[i] - lows[i], abs(highs[i] - closes[i - 1]), abs(lows[i] - closes[i - 1]))
        for i in range(1, 60)
    ]
    m = 4
    atr = [math.nan] * m + [sum(tr[1 : m + 1]) / m]
    for t in tr[m + 1 :]:
        atr.append((atr[-1] * (m - 1) + t) / m)
    ch = [closes[i] - closes[i - 1] for i in range(1, 60)]
    gain = sum(max(x, 0) for x in ch[:m]) / m
    loss = sum(max(-x, 0) for x in ch[:m]) / m
    rsi = [math.nan] * m + [100 * gain / (gain + loss)]
    for x in ch[m:]:
        gain = (gain * (m - 1) + max(x, 0)) / m
        loss = (loss * (m - 1) + max(-x, 0)) / m
        rsi.append(100 * gain / (gain + loss))
    for i in range(20, 60):
        s = sigs[T0 + i * MINUTE_MS]
        w = closes[i - 4 : i + 1]
        mean = sum(w) / 5
        sd = math.sqrt(sum((x - mean) ** 2 for x in w) / 5)
        rets = [math.log(closes[j] / closes[j - 1]) for j in range(i - 4, i + 1)]
        rm = sum(rets) / 5
        tp = [(highs[j] + lows[j] + closes[j]) / 3 for j in range(i - 4, i + 1)]
        assert s.values["sma"] == pytest.approx(mean, abs=1e-9)
        assert s.values["ema"] == pytest.approx(ema[i], abs=1e-9)
        assert s.values["atr"] == pytest.approx(atr[i], abs=1e-9)
        assert s.values["rsi"] == pytest.approx(rsi[i], abs=1e-9)
        assert s.values["bb_upper"] == pytest.approx(mean + 2 * sd, abs=1e-9)
        assert s.values["bb_width"] == pytest.approx(4 * sd / mean, abs=1e-12)
        assert s.values["dc_upper"] == max(highs[i - 4 : i + 1])
        assert s.values["dc_lower"] == min(lows[i - 4 : i + 1])
        assert s.values["volatility"] == pytest.approx(
            math.sqrt(sum((r - rm) ** 2 for r in rets) / 5), abs=1e-12
        )
        assert s.values["vwap"] == pytest.approx(
            sum(t * v for t, v in zip(tp, vols[i - 4 : i + 1], strict=True))
            / sum(vols[i - 4 : i + 1]),
            abs=1e-9,
        )
        assert s.values["trend"] == pytest.approx((ema[i] - ema[i - 2]) / (2 * atr[i]), abs=1e-12)
        assert 0 <= s.values["adx"] <= 100 and 0 <= s.values["plus_di"] <= 100


def test_signal_carries_candle_identity_event_time_and_survives_the_wire() -> None:
    eng = SignalEngine(SMALL)
    sig = None
    for i, (h, lo, c, v) in enumerate(random_walk(20)):
        for s in eng.on_candle(candle(i, c, high=h, low=lo, volume=v)):
            sig = s
    assert sig is not None
    c = candle(19, 0)
    assert sig.id == signal_id("BTCUSDT", "1m", c.open_time) == f"signal:BTCUSDT:1m:{c.open_time}"
    assert sig.ts_event == c.ts_event
    assert (sig.symbol, sig.interval, sig.open_time) == ("BTCUSDT", "1m", c.open_time)
    again = codec.decode(codec.encode(sig))
    assert isinstance(again, Signal) and again == sig and again.values == sig.values


def test_duplicates_and_out_of_order_candles_are_dropped_without_touching_state() -> None:
    walk = random_walk(30)
    clean, noisy = SignalEngine(SMALL), SignalEngine(SMALL)
    clean_out: list[Signal] = []
    noisy_out: list[Signal] = []
    for i, (h, lo, c, v) in enumerate(walk):
        clean_out += clean.on_candle(candle(i, c, high=h, low=lo, volume=v))
        noisy_out += noisy.on_candle(candle(i, c, high=h, low=lo, volume=v))
        assert noisy.on_candle(candle(i, c, high=h, low=lo, volume=v)) == []
        if i >= 1:
            assert noisy.on_candle(candle(i - 1, 999, high=1000, low=1)) == []
    assert noisy_out == clean_out
    assert len(clean_out) == len(walk) - SMALL.warmup + 1
    assert noisy.seen("BTCUSDT", "1m") == len(walk)
    assert noisy.last_open_time("BTCUSDT", "1m") == candle(29, 0).open_time


def test_series_are_independent_per_symbol_and_interval() -> None:
    eng = SignalEngine(SMALL)
    walk = random_walk(14)
    eth = [
        eng.on_candle(candle(i, c, high=h, low=lo, symbol="ETHUSDT"))
        for i, (h, lo, c, _) in enumerate(walk)
    ]
    five = [eng.on_candle(candle(i, c, interval="5m")) for i, (_, _, c, _) in enumerate(walk[:10])]
    assert [len(o) for o in eth] == [0] * 13 + [1]
    assert all(not o for o in five)
    assert eng.on_candle(candle(0, 1)) == []
    assert eng.seen("BTCUSDT", "1m") == 1
    assert eng.seen("ETHUSDT", "1m") == 14
    assert eng.seen("BTCUSDT", "5m") == 10


def steps(tracker: RegimeTracker, rows: list[tuple[float, float, float, float]]) -> list[str]:
    return [tracker.step(*r) for r in rows]


P = SignalParams(adx_enter=25, adx_exit=20, vol_enter_z=2, vol_exit_z=1, min_dwell=3)


def test_regime_trend_needs_adx_above_enter_and_holds_until_below_exit() -> None:
    t = RegimeTracker(P)
    # adx, +DI, -DI, width z
    got = steps(
        t,
        [
            (22, 30, 10, 0),
            (26, 30, 10, 0),
            (23, 30, 10, 0),
            (21, 30, 10, 0),
            (20, 30, 10, 0),
            (19.9, 30, 10, 0),
        ],
    )
    assert got == ["range", "trend_up", "trend_up", "trend_up", "trend_up", "range"]


def test_regime_direction_follows_the_dominant_di_after_the_dwell() -> None:
    t = RegimeTracker(P)
    got = steps(t, [(30, 10, 30, 0), (30, 30, 10, 0), (30, 30, 10, 0), (30, 30, 10, 0)])
    # trend_down entered at once (initial dwell is satisfied), the flip waits 3 candles
    assert got == ["trend_down", "trend_down", "trend_down", "trend_up"]


def test_regime_high_volatility_enters_at_once_and_exits_below_its_exit_threshold() -> None:
    t = RegimeTracker(P)
    rows = [(30, 30, 10, 0), (30, 30, 10, 2.5), (10, 30, 10, 1.5), (10, 30, 10, 1.2)]
    rows += [(10, 30, 10, 0.9), (10, 30, 10, 0.5)]
    # entered at once from a trend; z 1.5 and 1.2 are above the exit (1): held
    assert steps(t, rows) == ["trend_up"] + ["high_volatility"] * 3 + ["range"] * 2


def test_regime_leaves_high_volatility_only_after_the_minimum_dwell() -> None:
    t = RegimeTracker(P)
    rows = [(10, 30, 10, 0), (10, 30, 10, 3.0), (10, 30, 10, 0.0), (10, 30, 10, 0.0)]
    rows += [(10, 30, 10, 0.0), (10, 30, 10, 3.0)]
    assert steps(t, rows) == ["range"] + ["high_volatility"] * 3 + ["range", "high_volatility"]


def test_flat_market_is_range_with_zero_atr() -> None:
    eng = SignalEngine(SMALL)
    out: list[Signal] = []
    for i in range(30):
        out += eng.on_candle(candle(i, 100))
    assert out
    assert all(s.atr == 0.0 and s.trend == 0.0 and s.volatility == 0.0 for s in out)
    assert all(s.values["bb_width_z"] == 0.0 and s.values["rsi"] == 0.0 for s in out)
    assert {s.regime for s in out} == {"range"}


@pytest.mark.parametrize(
    "kwargs",
    [
        {"ema_period": 0},
        {"vol_window": 1},
        {"adx_period": 1},
        {"bb_k": 0},
        {"adx_exit": 30.0},
        {"vol_exit_z": 3.0},
    ],
)
def test_invalid_params_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        SignalParams(**kwargs)  # type: ignore[arg-type]
