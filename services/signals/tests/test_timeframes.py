"""5m / 15m / 1h candles built from real 1m candles equal Binance's own candles."""

from __future__ import annotations

import pytest
from signals_factories import PAIRS, SMALL, candles, engine_signals

from gridstream.common.messages import Candle
from gridstream.core.signals.engine import SignalEngine
from gridstream.core.signals.timeframes import CandleAggregator, ratio

OHLCV = ("open_time", "close_time", "open", "high", "low", "close", "volume")


def built(base: list[Candle], interval: str) -> list[Candle]:
    agg = CandleAggregator(base[0].symbol, interval)
    return [c for c in (agg.add(b) for b in base) if c is not None]


def assert_same_candles(ours: list[Candle], binance: list[Candle]) -> None:
    by_open = {c.open_time: c for c in ours}
    assert binance
    for want in binance:
        got = by_open[want.open_time]
        for name in OHLCV:
            assert getattr(got, name) == getattr(want, name), (want.open_time, name)
        assert got.interval == want.interval and got.source == "agg"


def one_minute_window(symbol: str, first_open: int, last_open: int) -> list[Candle]:
    return [c for c in candles(symbol) if first_open <= c.open_time <= last_open]


@pytest.mark.parametrize("symbol", PAIRS)
@pytest.mark.parametrize("interval", ["5m", "1h"])
def test_built_candles_equal_binance_candles(symbol: str, interval: str) -> None:
    binance = candles(symbol, interval)
    step = binance[1].open_time - binance[0].open_time
    base = one_minute_window(symbol, binance[0].open_time, binance[-1].open_time + step - 1)
    assert len(base) == len(binance) * ratio("1m", interval)
    ours = built(base, interval)
    assert len(ours) == len(binance)
    assert_same_candles(ours, binance)


@pytest.mark.parametrize("symbol", ["BTCUSDT", "ETHUSDT"])
def test_built_15m_candles_equal_binance_candles(symbol: str) -> None:
    base = candles(symbol, "1m", suffix="-20250520")
    binance = candles(symbol, "15m", suffix="-20250520")
    ours = built(base, "15m")
    assert len(ours) == len(binance) == 96
    assert_same_candles(ours, binance)


def test_bucket_is_emitted_only_when_complete_and_only_by_its_last_minute() -> None:
    base = one_minute_window("BTCUSDT", 1776211200000, 1776211200000 + 15 * 60_000 - 1)
    agg = CandleAggregator("BTCUSDT", "5m")
    outs = [agg.add(c) for c in base]
    assert [i for i, o in enumerate(outs) if o is not None] == [4, 9, 14]
    last = outs[4]
    assert last is not None and last.ts_event == base[4].ts_event  # event time of its close

    # a missing minute: that bucket is dropped, the next one is whole again
    gappy = CandleAggregator("BTCUSDT", "5m")
    outs = [gappy.add(c) for i, c in enumerate(base) if i != 7]
    assert [o.open_time for o in outs if o is not None] == [base[0].open_time, base[10].open_time]
    assert gappy.incomplete == 1
    # the bucket's last minute missing: dropped when the next bucket starts
    tail = CandleAggregator("BTCUSDT", "5m")
    outs = [tail.add(c) for i, c in enumerate(base) if i != 4]
    assert [o.open_time for o in outs if o is not None] == [base[5].open_time, base[10].open_time]
    assert tail.incomplete == 1


def test_engine_signals_of_built_candles_equal_signals_of_binance_candles() -> None:
    binance = candles("XRPUSDT", "5m")
    base = one_minute_window("XRPUSDT", binance[0].open_time, binance[-1].open_time + 299_999)
    eng = SignalEngine(SMALL, higher=("5m", "15m"))
    got = [s for c in base for s in eng.on_candle(c)]
    five = [s for s in got if s.interval == "5m"]
    want = engine_signals(binance, SMALL)
    assert [s.open_time for s in five] == [s.open_time for s in want]
    for a, b in zip(five, want, strict=True):
        assert a.values == b.values and a.regime == b.regime
    # each 5m signal comes with the 1m candle that closes its bucket, never before
    eng2 = SignalEngine(SMALL, higher=("5m",))
    for c in base:
        for s in eng2.on_candle(c):
            if s.interval == "5m":
                assert c.open_time == s.open_time + 4 * 60_000
                assert s.ts_event == c.ts_event  # event time of the closing 1m candle
    assert {s.interval for s in got} == {"1m", "5m", "15m"}
    assert eng.incomplete_buckets("XRPUSDT") == 0
