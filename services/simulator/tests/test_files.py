"""Replay of any candle or trade file: real trades -> klines exactly as Binance builds them."""

from __future__ import annotations

import asyncio
import csv
import gzip
import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from sim_helpers import FIXTURES, settings

from gridstream.simulator.engine import ApiError
from gridstream.simulator.server import build_engine, start

TRADES = FIXTURES / "BTCUSDT-trades-2021-01-08.slice.csv"
AGG = FIXTURES / "XRPETH-aggTrades-2019-10-11.slice.noheader.csv"
FIVE_MIN = FIXTURES / "BTCUSDT-5m-2024-03-01.slice.csv.gz"
Q8 = Decimal("0.00000001")


def f8(d: Decimal) -> str:
    return f"{d.quantize(Q8):f}"


def file_prints(path: Path) -> list[dict[str, Any]]:
    """The file's trades as dicts (independent of the simulator's loader)."""
    rows = [r for r in csv.reader(path.open()) if r and r[0].isdigit()]
    out = []
    for r in rows:
        if len(r) >= 8:  # aggTrades
            out.append(
                {
                    "a": int(r[0]),
                    "p": Decimal(r[1]),
                    "q": Decimal(r[2]),
                    "f": int(r[3]),
                    "l": int(r[4]),
                    "T": int(r[5]),
                    "m": r[6] == "true",
                }
            )
        else:
            tid = int(r[0])
            out.append(
                {
                    "a": None,
                    "p": Decimal(r[1]),
                    "q": Decimal(r[2]),
                    "f": tid,
                    "l": tid,
                    "T": int(r[4]),
                    "m": r[5] == "true",
                }
            )
    return out


def direct_klines(prints: list[dict[str, Any]]) -> list[list[Any]]:
    """1m klines computed straight from the trades, Binance's way."""
    by: dict[int, list[dict[str, Any]]] = {}
    for p in prints:
        by.setdefault(p["T"] // 60_000 * 60_000, []).append(p)
    rows = []
    prev = prints[0]["p"]
    for t in range(min(by), max(by) + 60_000, 60_000):
        ps = by.get(t, [])
        if not ps:
            rows.append([t, *[f8(prev)] * 4, f8(Decimal(0)), t + 59_999, f8(Decimal(0)), 0])
            rows[-1] += [f8(Decimal(0)), f8(Decimal(0)), "0"]
            continue
        prices = [p["p"] for p in ps]
        taker = [p for p in ps if not p["m"]]
        rows.append(
            [
                t,
                f8(prices[0]),
                f8(max(prices)),
                f8(min(prices)),
                f8(prices[-1]),
                f8(sum((p["q"] for p in ps), Decimal(0))),
                t + 59_999,
                f8(sum((p["p"] * p["q"] for p in ps), Decimal(0))),
                sum(p["l"] - p["f"] + 1 for p in ps),
                f8(sum((p["q"] for p in taker), Decimal(0))),
                f8(sum((p["p"] * p["q"] for p in taker), Decimal(0))),
                "0",
            ]
        )
        prev = prices[-1]
    return rows


async def replay_all(url: str, streams: str) -> list[dict[str, Any]]:
    """Connect one market-data client and read every frame until the window is done."""
    frames: list[dict[str, Any]] = []
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(f"{url}/stream?streams={streams}")
        async with asyncio.timeout(20):
            while True:
                try:
                    msg = await ws.receive(timeout=0.3)
                except TimeoutError:
                    st = await (await http.get(url + "/sim/status")).json()
                    if st["done"]:
                        break
                    continue
                frames.append(json.loads(msg.data))
        await ws.close()
    return frames


@pytest.mark.parametrize(
    ("symbol", "path", "history_min", "minutes"),
    [("XRPETH", AGG, 10, 50), ("BTCUSDT", TRADES, 0, 1)],
)
async def test_trade_file_replay_builds_binance_klines(
    symbol: str, path: Path, history_min: int, minutes: int
) -> None:
    prints = file_prints(path)
    want = direct_klines(prints)
    first = want[0][0]
    start_ms = first + history_min * 60_000
    end_ms = start_ms + minutes * 60_000
    s = settings(
        symbols=(symbol,),
        files={symbol: str(path)},
        start_ms=start_ms,
        hours=minutes / 60,
        speed=0.0,
    )
    runner, url = await start(s)
    low = symbol.lower()
    try:
        frames = await replay_all(url, f"{low}@kline_1m/{low}@aggTrade/{low}@trade")
        # the real trades, replayed as they are (ids, prices, qty, times, sides)
        in_window = [p for p in prints if start_ms <= p["T"] < end_ms]
        agg = [f["data"] for f in frames if f["stream"] == f"{low}@aggTrade"]
        assert [(a["p"], a["q"], a["f"], a["l"], a["T"], a["m"]) for a in agg] == [
            (f8(p["p"]), f8(p["q"]), p["f"], p["l"], p["T"], p["m"]) for p in in_window
        ]
        if in_window[0]["a"] is not None:
            assert [a["a"] for a in agg] == [p["a"] for p in in_window]
        trades = [f["data"] for f in frames if f["stream"] == f"{low}@trade"]
        assert [t["t"] for t in trades] == [p["f"] for p in in_window]
        # closed ws klines == direct computation from the file
        closed = [
            f["data"]["k"] for f in frames if f["data"]["e"] == "kline" and f["data"]["k"]["x"]
        ]
        window_rows = [r for r in want if start_ms <= r[0] < end_ms]
        assert len(closed) == len(window_rows) == minutes
        assert len(agg) == len(in_window) > 50
        assert [
            [k["t"], k["o"], k["h"], k["l"], k["c"], k["v"], k["T"], k["q"], k["n"], k["V"], k["Q"]]
            for k in closed
        ] == [r[:11] for r in window_rows]
        for k in closed:
            if k["n"]:
                mine = [p for p in in_window if k["t"] <= p["T"] <= k["T"]]
                assert (k["f"], k["L"]) == (mine[0]["f"], mine[-1]["l"])
        # REST: every candle up to the replay clock (history + window) == direct computation
        async with aiohttp.ClientSession() as http:
            r = await http.get(
                url + "/api/v3/klines",
                params={"symbol": symbol, "interval": "1m", "startTime": first, "limit": 1000},
            )
            got = await r.json()
            assert got == [row for row in want if row[0] < end_ms]
            info = await (await http.get(url + "/api/v3/exchangeInfo")).json()
        filters = {f["filterType"]: f for f in info["symbols"][0]["filters"]}
        if symbol == "XRPETH":  # not a known symbol: filters derived from the data
            assert (info["symbols"][0]["baseAsset"], info["symbols"][0]["quoteAsset"]) == (
                "XRP",
                "ETH",
            )
            assert filters["PRICE_FILTER"]["tickSize"] == "0.00000001"
            assert filters["LOT_SIZE"]["stepSize"] == "1.00000000"  # whole-unit quantities
        else:
            assert filters["PRICE_FILTER"]["tickSize"] == "0.01000000"  # recorded filters
    finally:
        await runner.cleanup()


async def test_five_minute_candle_file_replay() -> None:
    with gzip.open(FIVE_MIN, "rt") as fh:
        rows = [r for r in csv.reader(fh)][1:]
    first = int(rows[0][0])
    start_ms = first + 2 * 3_600_000  # 2 h of history, then 30 minutes replayed
    s = settings(
        symbols=("BTCUSDT",), files={"BTCUSDT": str(FIVE_MIN)}, start_ms=start_ms, hours=0.5
    )
    runner, url = await start(s)
    try:
        frames = await replay_all(url, "btcusdt@kline_5m/btcusdt@trade")
        closed = [
            f["data"]["k"] for f in frames if f["data"]["e"] == "kline" and f["data"]["k"]["x"]
        ]
        in_window = [r for r in rows if start_ms <= int(r[0]) < start_ms + 1_800_000]
        assert len(closed) == 6
        assert [(k["t"], k["T"], k["i"]) for k in closed] == [
            (int(r[0]), int(r[0]) + 299_999, "5m") for r in in_window
        ]
        assert [[k["o"], k["h"], k["l"], k["c"], k["v"]] for k in closed] == [
            [f8(Decimal(x)) for x in r[1:6]] for r in in_window
        ]
        trades = [f["data"] for f in frames if f["data"]["e"] == "trade"]
        assert len(trades) == 6 * 8 and trades[-1]["T"] < start_ms + 1_800_000
        async with aiohttp.ClientSession() as http:

            async def kl(**p: Any) -> Any:
                r = await http.get(url + "/api/v3/klines", params={"symbol": "BTCUSDT", **p})
                return r.status, await r.json()

            st, got = await kl(interval="5m", startTime=first, limit=1000)
            assert st == 200
            assert [g[0] for g in got] == [
                int(r[0]) for r in rows if int(r[0]) < start_ms + 1_800_000
            ]
            assert [g[1:6] for g in got[:30]] == [
                [f8(Decimal(x)) for x in r[1:6]] for r in rows[:30]
            ]
            st, got = await kl(interval="15m", startTime=first, limit=2)
            assert [g[0] for g in got] == [first, first + 900_000]
            assert got[0][2] == f8(max(Decimal(r[2]) for r in rows[:3]))
            assert got[0][5] == f8(sum((Decimal(r[5]) for r in rows[:3]), Decimal(0)))
            st, err = await kl(interval="1m")
            assert (st, err) == (400, {"code": -1120, "msg": "Invalid interval."})
    finally:
        await runner.cleanup()


def test_binance_kline_layout_without_header_and_microseconds(tmp_path: Path) -> None:
    """data.binance.vision kline CSV (12 columns, no header; spot files since 2025 in µs):
    its own quote volume, trade count and taker volumes are served as they are."""
    t0 = 1_735_689_600_000  # 2025-01-01
    lines = []
    for i in range(5):
        t = t0 + i * 60_000
        lines.append(
            f"{t * 1000},0.5{i},0.6{i},0.4{i},0.55,100.{i},{(t + 59_999) * 1000 + 999},"
            f"55.{i},{10 + i},40.{i},22.{i},0"
        )
    p = tmp_path / "DOGEUSDT-1m-2025-01-01.csv"
    p.write_text("\n".join(lines) + "\n")
    s = settings(
        symbols=("DOGEUSDT",),
        files={"DOGEUSDT": str(p)},
        start_ms=t0 + 5 * 60_000,
        filters={},
    )
    eng = build_engine(s)
    got = eng.klines("DOGEUSDT", "1m", t0, None, 10)
    assert got[0] == [
        t0,
        "0.50000000",
        "0.60000000",
        "0.40000000",
        "0.55000000",
        "100.00000000",
        t0 + 59_999,
        "55.00000000",
        10,
        "40.00000000",
        "22.00000000",
        "0",
    ]
    assert [g[8] for g in got] == [10, 11, 12, 13, 14]
    assert eng.specs["DOGEUSDT"].tick == Decimal("0.01")
    with pytest.raises(ApiError):
        eng.klines("DOGEUSDT", "7m", None, None, 10)


def test_filters_override_and_settings(tmp_path: Path) -> None:
    from gridstream.simulator.settings import FilterSpec, load_sim_settings

    s = load_sim_settings(
        {
            "GS_SIM_FILES": f"xrpeth={AGG}",
            "GS_SIM_FILTERS": "XRPETH=0.00000010/0.1/0.001",
            "GS_SIM_WEIGHT_LIMIT": "1200",
            "GS_SIM_WEIGHT_WINDOW_S": "2",
            "GS_SIM_BAN_SECONDS": "0.5",
            "GS_SIM_FAULTS": "drop@3; drop-every@10;silence@5:2.5;repeat@7:4",
        }
    )
    assert s.symbols == ("XRPETH",)
    assert s.filters == {
        "XRPETH": FilterSpec(Decimal("0.00000010"), Decimal("0.1"), Decimal("0.001"))
    }
    assert (s.weight_limit, s.weight_window_s, s.ban_seconds) == (1200, 2.0, 0.5)
    assert [(f.kind, f.minute, f.arg) for f in s.faults] == [
        ("drop", 3, 0.0),
        ("drop-every", 10, 0.0),
        ("silence", 5, 2.5),
        ("repeat", 7, 4.0),
    ]
    eng = build_engine(s)
    sp = eng.specs["XRPETH"]
    assert (sp.tick, sp.step, sp.min_notional) == (
        Decimal("0.0000001"),
        Decimal("0.1"),
        Decimal("0.001"),
    )


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("GS_SIM_FAULTS", "explode@3"),
        ("GS_SIM_FAULTS", "drop@x"),
        ("GS_SIM_FAULTS", "drop-every@0"),
        ("GS_SIM_FAULTS", "silence@2"),
        ("GS_SIM_FAULTS", "repeat@2:1.5"),
        ("GS_SIM_FAULTS", "drop@2:5"),
        ("GS_SIM_FILES", "BTCUSDT=/no/such/file.csv"),
        ("GS_SIM_FILTERS", "XRPETH=0.1"),
        ("GS_SIM_WEIGHT_LIMIT", "0"),
        ("GS_SIM_SYMBOLS", "DOGEUSDT"),
    ],
)
def test_invalid_new_settings_name_the_variable(var: str, value: str) -> None:
    from gridstream.simulator.settings import SettingsError, load_sim_settings

    with pytest.raises(SettingsError) as exc:
        load_sim_settings({var: value})
    assert exc.value.var == var


def test_rest_forming_kline_is_built_from_replayed_trades_only() -> None:
    prints = file_prints(AGG)
    first = prints[0]["T"] // 60_000 * 60_000
    s = settings(
        symbols=("XRPETH",),
        files={"XRPETH": str(AGG)},
        start_ms=first + 5 * 60_000,
        hours=1.0,
        rest_forming_kline=True,
    )
    eng = build_engine(s)
    # step until a minute has printed some but not all of its trades
    while True:
        eng.step()
        clock = eng.clock_ms
        minute = clock - clock % 60_000
        done = [p for p in prints if minute <= p["T"] <= clock]
        rest = [p for p in prints if clock < p["T"] < minute + 60_000]
        if done and rest:
            break
    got = eng.klines("XRPETH", "1m", None, None, 3)
    assert [g[0] for g in got] == [minute - 120_000, minute - 60_000, minute]
    assert got[-1] == direct_klines(done)[0][:6] + [minute + 59_999] + direct_klines(done)[0][7:]
    assert got[-1][6] > eng.clock_ms  # still forming: a client must drop it
    assert eng.klines("XRPETH", "1m", minute, None, 10) == [got[-1]]
    eng.rest_forming_kline = False
    assert [g[0] for g in eng.klines("XRPETH", "1m", None, None, 3)][-1] == minute - 60_000
