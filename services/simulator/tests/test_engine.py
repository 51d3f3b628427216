"""Engine-level tests: trade path, replay order, no future leak, klines paging."""

from __future__ import annotations

from decimal import Decimal

import pytest
from sim_helpers import WINDOW_START, read_csv

from gridstream.simulator.data import Candle, CandleSeries, load_candles, synth_trades
from gridstream.simulator.engine import Engine, MarketEvent
from gridstream.simulator.settings import default_data_dir
from gridstream.simulator.symbols import load_specs

TICK = Decimal("0.01")


def candle(o: str, h: str, lo: str, c: str, v: str, t: int = 60_000) -> Candle:
    return Candle(t, Decimal(o), Decimal(h), Decimal(lo), Decimal(c), Decimal(v))


@pytest.mark.parametrize("n", [4, 5, 8, 13, 60])
def test_trade_path_hits_ohlc_and_sums_volume(n: int) -> None:
    for c in (
        candle("100.00", "101.50", "99.10", "100.70", "12.34567891"),  # up: low first
        candle("100.00", "100.40", "98.00", "98.50", "0.00000007"),  # down: high first
        candle("50.00", "50.00", "50.00", "50.00", "3"),  # flat
    ):
        tr = synth_trades(c, n, TICK)
        prices = [t.price for t in tr]
        assert len(tr) == n
        assert prices[0] == c.open and prices[-1] == c.close
        assert max(prices) == c.high and min(prices) == c.low
        assert sum(t.qty for t in tr) == c.volume
        assert all(t.qty >= 0 and t.qty.as_tuple().exponent >= -8 for t in tr)
        assert all(p % TICK == 0 for p in prices)
        times = [t.time for t in tr]
        assert times == sorted(times) and times[0] == c.open_time
        assert times[-1] <= c.close_time
        # wrong-side extreme first
        hi_i, lo_i = prices.index(c.high), prices.index(c.low)
        if c.close < c.open:
            assert hi_i <= lo_i
        elif c.high != c.low:
            assert lo_i < hi_i
        # monotone between vertices: path never overshoots the range
        assert all(c.low <= p <= c.high for p in prices)


def test_trade_path_on_real_candles() -> None:
    cs = load_candles(default_data_dir() / "XRPUSDT-1m.csv.gz", until_open_ms=WINDOW_START)
    tick = load_specs()["XRPUSDT"].tick
    for c in cs[:500]:
        tr = synth_trades(c, 8, tick)
        ps = [t.price for t in tr]
        assert (ps[0], max(ps), min(ps), ps[-1]) == (c.open, c.high, c.low, c.close)
        assert sum(t.qty for t in tr) == c.volume


def make_engine(hours: float = 0.25) -> Engine:
    d = default_data_dir()
    end = WINDOW_START + int(hours * 3_600_000)
    series = {
        s: CandleSeries(load_candles(d / f"{s}-1m.csv.gz", until_open_ms=end))
        for s in ("BTCUSDT", "ETHUSDT")
    }
    return Engine(
        series=series,
        specs=load_specs(),
        window_start=WINDOW_START,
        window_end=end,
        trades_per_candle=8,
        balances={"USDT": Decimal(700)},
        maker_fee=Decimal("0.001"),
        taker_fee=Decimal("0.001"),
    )


def test_replay_never_leaks_future_candles() -> None:
    eng = make_engine(0.1)  # 6 minutes
    trade_ids: dict[str, list[int]] = {"BTCUSDT": [], "ETHUSDT": []}
    closed_seen: list[int] = []
    last_t = 0
    while (t := eng.peek_time()) is not None:
        assert t >= last_t
        last_t = t
        for ev in eng.step():
            assert isinstance(ev, MarketEvent)
            p = ev.payload
            if p["e"] == "trade":
                trade_ids[p["s"]].append(p["t"])
                assert p["T"] <= eng.clock_ms
            if p["e"] == "kline" and p["s"] == "BTCUSDT" and p["k"]["x"]:
                closed_seen.append(p["k"]["t"])
        rows = eng.klines("BTCUSDT", "1m", WINDOW_START, None, 1000)
        assert all(r[6] <= eng.clock_ms for r in rows)
        assert [r[0] for r in rows] == closed_seen
        latest = eng.klines("BTCUSDT", "1m", None, None, 1)
        assert latest[0][6] <= eng.clock_ms
    assert eng.done and len(closed_seen) == 6
    for ids in trade_ids.values():
        assert ids == sorted(set(ids)) and len(ids) == 6 * 8


def test_kline_frames_forming_then_closed() -> None:
    eng = make_engine(0.05)
    frames = []
    while eng.peek_time() is not None:
        frames += [
            e.payload
            for e in eng.step()
            if isinstance(e, MarketEvent) and e.stream == "btcusdt@kline_1m"
        ]
    first = [f for f in frames if f["k"]["t"] == WINDOW_START]
    assert [f["k"]["x"] for f in first] == [False, True]
    row = read_csv("BTCUSDT", 1, WINDOW_START)[0]
    k = first[1]["k"]
    assert [Decimal(k[x]) for x in "ohlcv"] == [Decimal(v) for v in row[1:6]]
    assert first[1]["E"] == k["T"] == WINDOW_START + 59_999
    assert k["n"] == 8 and k["L"] - k["f"] == 7


def test_klines_paging_and_aggregation() -> None:
    eng = make_engine(0.05)
    rows_csv = read_csv("BTCUSDT", 1440, WINDOW_START - 86_400_000)
    eng.clock_ms = WINDOW_START - 1  # nothing of the window is closed yet
    # startTime: first `limit` candles with open >= startTime
    s = int(rows_csv[10][0]) + 1
    got = eng.klines("BTCUSDT", "1m", s, None, 5)
    assert [r[0] for r in got] == [int(x[0]) for x in rows_csv[11:16]]
    assert got[0][1:6] == [f"{Decimal(v):.8f}" for v in rows_csv[11][1:6]]
    # startTime + endTime (inclusive on open time)
    got = eng.klines("BTCUSDT", "1m", int(rows_csv[0][0]), int(rows_csv[2][0]), 500)
    assert [r[0] for r in got] == [int(x[0]) for x in rows_csv[0:3]]
    # no startTime: latest `limit` closed candles
    got = eng.klines("BTCUSDT", "1m", None, None, 3)
    assert [r[0] for r in got] == [int(x[0]) for x in rows_csv[-3:]]
    assert got[-1][6] == WINDOW_START - 1
    # endTime only: latest `limit` at or before endTime
    got = eng.klines("BTCUSDT", "1m", None, int(rows_csv[100][0]), 2)
    assert [r[0] for r in got] == [int(x[0]) for x in rows_csv[99:101]]
    # future: nothing beyond the clock even if asked
    assert eng.klines("BTCUSDT", "1m", WINDOW_START, None, 10) == []
    # 5m aggregation of complete buckets
    got = eng.klines("BTCUSDT", "5m", None, None, 2)
    b = got[-1][0]
    assert b % 300_000 == 0 and got[-1][6] == b + 299_999
    part = [r for r in rows_csv if b <= int(r[0]) < b + 300_000]
    assert Decimal(got[-1][1]) == Decimal(part[0][1])
    assert Decimal(got[-1][2]) == max(Decimal(r[2]) for r in part)
    assert Decimal(got[-1][3]) == min(Decimal(r[3]) for r in part)
    assert Decimal(got[-1][4]) == Decimal(part[-1][4])
    assert Decimal(got[-1][5]) == sum(Decimal(r[5]) for r in part)
    assert got[-1][8] == 8 * len(part)


def test_every_user_fill_gets_its_own_trade_id() -> None:
    """Two resting orders crossed by the same print are two trades, never one id."""
    eng = make_engine(hours=2)
    last = eng.last_price["BTCUSDT"]
    for i, offset in enumerate(("0.01", "0.02", "0.03")):
        eng.place_order(
            {
                "symbol": "BTCUSDT",
                "side": "BUY",
                "type": "LIMIT",
                "timeInForce": "GTC",
                "quantity": "0.0002",
                "price": str(last - Decimal(offset)),
                "newClientOrderId": f"multi-{i}",
            }
        )
    while not eng.done and len(eng.fills) < 3:
        eng.step()
    assert len(eng.fills) == 3
    ids = [f.trade_id for f in eng.fills]
    assert len(set(ids)) == 3
    assert len({f.time for f in eng.fills}) == 1  # all three on one print
