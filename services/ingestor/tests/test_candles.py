"""Candles built from trades, checked against the exchange's own klines on real data.

Real trades with real klines of the same minute exist in one place we have: the recorded
Binance session of 2021-10-12 (cryptofeed), where LRCBTC's kline for 00:28 and the
aggTrade that is its first trade are both present (kline ``f`` == aggTrade ``f``). The
trade files in ../shared/data/trades (BTCUSDT 2021-01-08, XRPETH 2019-10) have no kline
data for the same minutes; they are replayed through the simulator instead
(tests/market_data).
"""

from __future__ import annotations

import csv
import json
from decimal import Decimal
from pathlib import Path

from ingestor_factories import FIXTURES, kline_frame, real_candles, trade_frame

from gridstream.common.binance.market import parse_frame
from gridstream.common.messages import Candle, Tick
from gridstream.ingestor.candles import CandleBuilder, differences
from gridstream.ingestor.engine import CandleCheck, IngestEngine

SESSION = FIXTURES / "ws_combined_stream_session-cryptofeed.jsonl"
TRADES = Path("/work/shared/data/trades/BTCUSDT-trades-2021-01-08.csv")
REPO_TRADES = Path(__file__).resolve().parents[3] / "data" / "trades"


def test_real_kline_equals_the_candle_built_from_its_real_trades() -> None:
    frames = [json.loads(line) for line in SESSION.read_text().splitlines()]
    kline = next(f["data"]["k"] for f in frames if f["stream"] == "lrcbtc@kline_1m")
    aggs = [f for f in frames if f["stream"] == "lrcbtc@aggTrade"]
    assert aggs[0]["data"]["f"] == kline["f"]  # the builder saw the minute's first trade
    b = CandleBuilder("1m", emit_first=True)
    for f in aggs:
        parsed = parse_frame(json.dumps(f))
        assert isinstance(parsed.message, Tick)
        b.on_tick(parsed.message, parsed.trades)
    built = b.forming("LRCBTC")
    assert built is not None
    c = built.candle
    assert c.open_time == kline["t"] and c.close_time == kline["T"]
    assert (c.open, c.high, c.low, c.close) == tuple(
        Decimal(kline[k]) for k in ("o", "h", "l", "c")
    )
    assert c.volume == Decimal(kline["v"])
    assert c.quote_volume == Decimal(kline["q"])
    assert c.trades == kline["n"] == kline["L"] - kline["f"] + 1
    assert built.taker_buy_volume == Decimal(kline["V"])


def test_nknusdt_kline_includes_the_recorded_aggtrade_as_its_last() -> None:
    frames = [json.loads(line) for line in SESSION.read_text().splitlines()]
    kline = next(f["data"]["k"] for f in frames if f["stream"] == "nknusdt@kline_1m")
    agg = next(f["data"] for f in frames if f["stream"] == "nknusdt@aggTrade")
    assert agg["l"] == kline["L"] and agg["p"] == kline["c"]


def real_trades() -> list[dict[str, str]]:
    with TRADES.open() as fh:
        return list(csv.DictReader(fh))


def test_builder_over_real_trades_is_exact_and_incremental() -> None:
    trades = real_trades()
    b = CandleBuilder("1m", emit_first=True)
    out = []
    for t in trades:
        out += b.add(
            "BTCUSDT",
            int(t["time_ms"]),
            Decimal(t["price"]),
            Decimal(t["qty"]),
            taker_buy=t["is_buyer_maker"] == "false",
        )
    assert out == []  # 46 s of one minute: nothing closed yet
    closed = b.advance("BTCUSDT", 1610064060000)
    assert len(closed) == 1
    c = closed[0].candle
    prices = [Decimal(t["price"]) for t in trades]
    assert c.open_time == 1610064000000 and c.close_time == 1610064059999
    assert (c.open, c.close) == (prices[0], prices[-1])
    assert (c.high, c.low) == (max(prices), min(prices))
    assert c.volume == sum(Decimal(t["qty"]) for t in trades)
    assert c.trades == len(trades) == 2001
    # the next minute had no trade in our data: Binance's rule gives a flat candle
    flat = b.advance("BTCUSDT", 1610064120000)[0].candle
    assert (flat.open, flat.high, flat.low, flat.close, flat.volume) == (
        prices[-1],
        prices[-1],
        prices[-1],
        prices[-1],
        0,
    )


def test_the_first_partial_bucket_is_never_emitted() -> None:
    b = CandleBuilder("1m")
    assert b.add("X", 30_000, Decimal(1), Decimal(1)) == []
    closed = b.add("X", 61_000, Decimal(2), Decimal(1))
    assert closed == []  # the 0..59999 bucket was joined mid-way
    closed = b.add("X", 121_000, Decimal(3), Decimal(1))
    assert [c.candle.open_time for c in closed] == [60_000]
    assert b.add("X", 60_500, Decimal(9), Decimal(1)) == [] and b.late == 1


def test_engine_compares_each_closed_kline_with_the_built_candle() -> None:
    """Trades of real minutes -> built candles; the exchange kline is checked against them."""
    rows = real_candles("BTCUSDT", 5)
    eng = IngestEngine("1m")
    tid = 1

    def trades_for(row: dict[str, str]) -> list[bytes]:
        nonlocal tid
        t0 = int(row["open_time_ms"])
        # open, high, low, close as four trades whose quantities add up to the volume
        vol = Decimal(row["volume"])
        qs = [vol / 4] * 3
        qs.append(vol - sum(qs))
        out = []
        for i, (p, q) in enumerate(
            zip((row["open"], row["high"], row["low"], row["close"]), qs, strict=True)
        ):
            out.append(trade_frame("BTCUSDT", tid, p, str(q), t0 + 1000 * (i + 1), i % 2 == 0))
            tid += 1
        return out

    checks: list[CandleCheck] = []
    for i, row in enumerate(rows):
        for f in trades_for(row):
            eng.on_frame(f)
        out = eng.on_frame(kline_frame(row))
        checks += [o for o in out if isinstance(o, CandleCheck)]
        assert any(isinstance(o, Candle) for o in out)
        if i == 0:
            assert checks == []  # the builder joined mid-stream: minute 0 is not checked
    # minutes 1..4: complete trade history; trade counts in data/klines are empty (skipped)
    assert [c.open_time for c in checks] == [int(r["open_time_ms"]) for r in rows[1:]]
    assert all(c.agrees for c in checks), [c.differences for c in checks]
    # a kline that disagrees with its trades is reported, field by field
    for f in trades_for(real_candles("BTCUSDT", 6)[5]):
        eng.on_frame(f)
    bad = dict(real_candles("BTCUSDT", 6)[5])
    bad["high"] = str(Decimal(bad["high"]) + 1)
    out = eng.on_frame(kline_frame(bad))
    check = next(o for o in out if isinstance(o, CandleCheck))
    assert not check.agrees and check.differences[0].startswith("high:")


def test_differences_names_each_field() -> None:
    rows = real_candles("BTCUSDT", 1)
    from ingestor_factories import rest_row

    from gridstream.common.binance.market import kline_row_to_candle

    a = kline_row_to_candle(rest_row(rows[0]), "BTCUSDT", "1m")
    assert differences(a, a) == []
    b = kline_row_to_candle([*rest_row(rows[0])[:5], "0", *rest_row(rows[0])[6:]], "BTCUSDT", "1m")
    assert [d.split(":")[0] for d in differences(a, b)] == ["volume"]
