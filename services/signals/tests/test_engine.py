"""SignalEngine: TA-Lib seeding, warm-up, duplicates, ids, regimes."""

from __future__ import annotations

import math
from decimal import Decimal

import pytest

from gridstream.common.messages import Candle
from gridstream.signals.engine import SignalEngine, SignalParams, classify, signal_id

MINUTE_MS = 60_000
T0 = 1_774_267_740_000


def candle(
    i: int,
    close: float | str,
    *,
    high: float | str | None = None,
    low: float | str | None = None,
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
        volume=Decimal(1),
    )


SMALL = SignalParams(ema_period=3, atr_period=3, vol_window=3, trend_lookback=2)


def test_warmup_is_the_first_index_where_every_indicator_is_defined() -> None:
    # ema defined at 2, trend at 2+2=4, atr at 3, vol at 3 -> first signal at index 4.
    assert SMALL.warmup == 5
    assert SignalParams().warmup == 61
    assert SignalParams(min_warmup=500).warmup == 500


def test_values_follow_talib_seeding_by_hand() -> None:
    highs = [10.5, 11.2, 12.0, 11.8, 12.6, 13.1]
    lows = [9.5, 10.1, 10.9, 10.7, 11.5, 12.0]
    closes = [10.0, 11.0, 11.5, 11.0, 12.5, 12.8]
    eng = SignalEngine(SMALL)
    outs = [eng.on_candle(candle(i, closes[i], high=highs[i], low=lows[i])) for i in range(6)]
    assert [len(o) for o in outs] == [0, 0, 0, 0, 1, 1]

    a = 2 / 4
    ema = [math.nan, math.nan, sum(closes[:3]) / 3]
    for c in closes[3:]:
        ema.append((1 - a) * ema[-1] + a * c)
    tr = [math.nan] + [
        max(highs[i] - lows[i], abs(highs[i] - closes[i - 1]), abs(lows[i] - closes[i - 1]))
        for i in range(1, 6)
    ]
    atr = [math.nan] * 3 + [sum(tr[1:4]) / 3]
    for t in tr[4:]:
        atr.append((atr[-1] * 2 + t) / 3)
    rets = [math.log(closes[i] / closes[i - 1]) for i in range(1, 6)]

    for i in (4, 5):
        sig = outs[i][0]
        window = rets[i - 3 : i]
        mean = sum(window) / 3
        vol = math.sqrt(sum((r - mean) ** 2 for r in window) / 3)
        assert sig.ema == pytest.approx(ema[i], rel=1e-12)
        assert sig.atr == pytest.approx(atr[i], rel=1e-12)
        assert sig.volatility == pytest.approx(vol, rel=1e-9)
        assert sig.trend == pytest.approx((ema[i] - ema[i - 2]) / (2 * atr[i]), rel=1e-12)


def test_signal_carries_candle_identity_and_event_time() -> None:
    eng = SignalEngine(SMALL)
    sig = None
    for i in range(5):
        out = eng.on_candle(candle(i, 100 + i, high=101 + i, low=99 + i))
        if out:
            sig = out[0]
    assert sig is not None
    c = candle(4, 104)
    assert sig.id == signal_id("BTCUSDT", "1m", c.open_time) == f"signal:BTCUSDT:1m:{c.open_time}"
    assert sig.ts_event == c.ts_event
    assert sig.close == Decimal("104")
    assert (sig.symbol, sig.interval, sig.open_time) == ("BTCUSDT", "1m", c.open_time)


def test_duplicates_and_out_of_order_candles_are_dropped_without_touching_state() -> None:
    closes = [100, 101, 103, 102, 104, 107, 106, 108]
    clean = SignalEngine(SMALL)
    noisy = SignalEngine(SMALL)
    clean_out = []
    noisy_out = []
    for i, c in enumerate(closes):
        clean_out += clean.on_candle(candle(i, c, high=c + 1, low=c - 1))
        noisy_out += noisy.on_candle(candle(i, c, high=c + 1, low=c - 1))
        # the same candle again, and an older one with different prices
        assert noisy.on_candle(candle(i, c, high=c + 1, low=c - 1)) == []
        if i >= 1:
            assert noisy.on_candle(candle(i - 1, 999, high=1000, low=1)) == []
    assert noisy_out == clean_out
    assert len(clean_out) == len(closes) - SMALL.warmup + 1
    assert noisy.seen("BTCUSDT", "1m") == len(closes)
    assert noisy.last_open_time("BTCUSDT", "1m") == candle(7, 0).open_time


def test_series_are_independent_per_symbol_and_interval() -> None:
    eng = SignalEngine(SMALL)
    eth = [eng.on_candle(candle(i, 100 + i, symbol="ETHUSDT")) for i in range(5)]
    five = [eng.on_candle(candle(i, 50 + i, interval="5m")) for i in range(4)]
    assert [len(o) for o in eth] == [0, 0, 0, 0, 1]
    assert all(not o for o in five)
    # BTCUSDT 1m has seen nothing: an older open time than ETH's is still new for it.
    assert eng.on_candle(candle(0, 1)) == []
    assert eng.seen("BTCUSDT", "1m") == 1
    assert eng.seen("ETHUSDT", "1m") == 5
    assert eng.seen("BTCUSDT", "5m") == 4


def _run(closes: list[float], spread: float, params: SignalParams) -> list[str]:
    eng = SignalEngine(params)
    regimes = []
    for i, c in enumerate(closes):
        for sig in eng.on_candle(candle(i, c, high=c + spread, low=c - spread)):
            regimes.append(sig.regime)
    return regimes


def test_regimes() -> None:
    params = SignalParams(
        ema_period=5,
        atr_period=5,
        vol_window=5,
        trend_lookback=2,
        trend_threshold=0.25,
        high_vol_threshold=0.02,
    )
    flat = [100.0 + (0.1 if i % 2 else -0.1) for i in range(30)]
    assert set(_run(flat, 0.2, params)) == {"range"}
    rising = [100.0 + i for i in range(30)]
    assert set(_run(rising, 0.2, params)) == {"trend_up"}
    falling = [200.0 - i for i in range(30)]
    assert set(_run(falling, 0.2, params)) == {"trend_down"}
    # wide candles: ATR/close ~ 5% > 2% wins over the trend
    assert set(_run(rising, 3.0, params)) == {"high_volatility"}


def test_classify_thresholds() -> None:
    p = SignalParams(trend_threshold=0.2, high_vol_threshold=0.01)
    assert classify(p, warm=False, close=100, atr=5, trend=1) == "warmup"
    assert classify(p, warm=True, close=100, atr=1.01, trend=1) == "high_volatility"
    assert classify(p, warm=True, close=100, atr=1.0, trend=0.21) == "trend_up"
    assert classify(p, warm=True, close=100, atr=1.0, trend=-0.21) == "trend_down"
    assert classify(p, warm=True, close=100, atr=1.0, trend=0.2) == "range"


def test_flat_market_has_zero_atr_and_zero_trend() -> None:
    eng = SignalEngine(SMALL)
    out = []
    for i in range(8):
        out += eng.on_candle(candle(i, 100))
    assert out
    assert all(s.atr == 0.0 and s.trend == 0.0 and s.volatility == 0.0 for s in out)
    assert {s.regime for s in out} == {"range"}


@pytest.mark.parametrize(
    "kwargs", [{"ema_period": 0}, {"vol_window": 1}, {"high_vol_threshold": 0}]
)
def test_invalid_params_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs)).split("_")[0]):
        SignalParams(**kwargs)  # type: ignore[arg-type]
