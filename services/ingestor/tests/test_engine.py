"""IngestEngine with real recorded frames and real 1m candles (data/klines)."""

from __future__ import annotations

import pytest
from ingestor_factories import (
    expected,
    fixture_bytes,
    kline_frame,
    real_candles,
    rest_row,
    trade_frame,
)

from gridstream.common.binance.market import MalformedFrame, kline_row_to_candle
from gridstream.common.messages import Candle, Tick
from gridstream.ingestor.engine import Gap, IngestEngine

ROWS = real_candles("BTCUSDT", 40)


def candles_of(outputs: list[object]) -> list[Candle]:
    return [o for o in outputs if isinstance(o, Candle)]


def test_closed_candles_pass_in_order_and_equal_the_source() -> None:
    eng = IngestEngine()
    got: list[Candle] = []
    for row in ROWS[:10]:
        got += candles_of(eng.on_frame(kline_frame(row)))
    assert [{k: getattr(c, k) for k in expected(ROWS[0])} for c in got] == [
        expected(r) for r in ROWS[:10]
    ]
    assert eng.watermark("BTCUSDT", "1m") == int(ROWS[9]["open_time_ms"])


def test_forming_candles_never_pass() -> None:
    eng = IngestEngine()
    # a real recorded forming kline, and forming versions of real candles
    assert eng.on_frame(fixture_bytes("ws_kline-cryptofeed.json")) == []
    for row in ROWS[:3]:
        assert eng.on_frame(kline_frame(row, closed=False)) == []
    assert eng.watermark("BTCUSDT", "1m") is None
    assert eng.ignored == 4


def test_duplicate_and_older_candles_are_dropped() -> None:
    eng = IngestEngine()
    assert len(eng.on_frame(kline_frame(ROWS[0]))) == 1
    assert len(eng.on_frame(kline_frame(ROWS[1]))) == 1
    assert eng.on_frame(kline_frame(ROWS[1])) == []
    assert eng.on_frame(kline_frame(ROWS[0])) == []
    assert eng.duplicates == 2
    # the same candle for another symbol or interval is not a duplicate
    assert len(eng.on_frame(kline_frame(ROWS[1], "ETHUSDT"))) == 1
    assert len(eng.on_frame(kline_frame(ROWS[1], interval="5m"))) == 1


def test_gap_is_reported_before_the_candle_that_reveals_it() -> None:
    eng = IngestEngine()
    eng.on_frame(kline_frame(ROWS[0]))
    eng.on_frame(kline_frame(ROWS[1]))
    out = eng.on_frame(kline_frame(ROWS[5]))
    assert len(out) == 2
    gap, candle = out
    assert gap == Gap("BTCUSDT", "1m", int(ROWS[2]["open_time_ms"]), int(ROWS[4]["open_time_ms"]))
    assert gap.missing == 3
    assert isinstance(candle, Candle) and candle.open_time == int(ROWS[5]["open_time_ms"])
    # REST answers more than the gap (and a duplicate): only the missing ones are kept
    rest = [kline_row_to_candle(rest_row(r), "BTCUSDT", "1m") for r in ROWS[0:7]]
    filled = IngestEngine.fill_gap(gap, rest + rest[3:4])
    assert [c.open_time for c in filled] == [int(r["open_time_ms"]) for r in ROWS[2:5]]
    assert [
        {k: getattr(c, k) for k in expected(r)} for c, r in zip(filled, ROWS[2:5], strict=True)
    ] == [expected(r) for r in ROWS[2:5]]
    # after the gap, the stream continues normally
    assert len(eng.on_frame(kline_frame(ROWS[6]))) == 1


def test_no_gap_without_a_watermark_and_after_a_reset() -> None:
    eng = IngestEngine()
    assert len(eng.on_frame(kline_frame(ROWS[10]))) == 1
    eng.set_watermark("BTCUSDT", "1m", int(ROWS[3]["open_time_ms"]))  # e.g. from Postgres
    out = eng.on_frame(kline_frame(ROWS[10]))  # now seen as new, with a gap 4..9
    assert isinstance(out[0], Gap) and out[0].missing == 6
    eng.set_watermark("BTCUSDT", "1m", None)
    assert eng.watermark("BTCUSDT", "1m") is None


def test_backfill_keeps_only_newer_candles_in_order() -> None:
    eng = IngestEngine()
    eng.set_watermark("BTCUSDT", "1m", int(ROWS[4]["open_time_ms"]))
    rest = [kline_row_to_candle(rest_row(r), "BTCUSDT", "1m") for r in ROWS[0:12]]
    new = eng.on_backfill(reversed(rest))
    assert [c.open_time for c in new] == [int(r["open_time_ms"]) for r in ROWS[5:12]]
    assert eng.watermark("BTCUSDT", "1m") == int(ROWS[11]["open_time_ms"])
    # live duplicates of backfilled candles are dropped; the next one passes
    assert eng.on_frame(kline_frame(ROWS[11])) == []
    assert len(eng.on_frame(kline_frame(ROWS[12]))) == 1


def test_recorded_trades_and_duplicate_trade_ids() -> None:
    eng = IngestEngine()
    [tick] = eng.on_frame(fixture_bytes("ws_spot_trade-nautilus.json"), ts_init=7)
    assert isinstance(tick, Tick)
    assert (tick.symbol, tick.trade_id, str(tick.price), tick.side) == (
        "ETHUSDT",
        705291099,
        "4149.74000000",
        "SELL",
    )
    assert tick.ts_init == 7
    assert eng.on_frame(fixture_bytes("ws_spot_trade-nautilus.json")) == []
    assert eng.on_frame(trade_frame("ETHUSDT", 705291098, "4149.7", "1", 1639351062243, True)) == []
    assert (
        len(eng.on_frame(trade_frame("ETHUSDT", 705291100, "4149.7", "1", 1639351062250, False)))
        == 1
    )
    # aggregate ids are another sequence: not compared with trade ids
    [agg] = eng.on_frame(fixture_bytes("ws_aggTrade-cryptofeed.json"))
    assert isinstance(agg, Tick) and agg.id.startswith("aggtick:")


def test_recorded_session_gives_only_its_trades() -> None:
    eng = IngestEngine()
    out: list[object] = []
    for line in fixture_bytes("ws_combined_stream_session-cryptofeed.jsonl").splitlines():
        out += eng.on_frame(line)
    assert [type(o) for o in out] == [Tick, Tick]
    assert {o.symbol for o in out if isinstance(o, Tick)} == {"NKNUSDT", "LRCBTC"}


@pytest.mark.parametrize("frame", [b"{oops", b'{"stream":"btcusdt@trade","data":{"e":"trade"}}'])
def test_malformed_frames_raise_with_the_raw_frame(frame: bytes) -> None:
    eng = IngestEngine()
    with pytest.raises(MalformedFrame) as info:
        eng.on_frame(frame)
    assert info.value.raw == frame
