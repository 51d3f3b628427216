"""Binance market-data parsing against recorded payloads, and fetch_klines against a real server."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gridstream.common import codec
from gridstream.common.binance import market as bm
from gridstream.common.messages import Candle, Tick

FIX = Path(__file__).parent / "fixtures" / "binance"


def load(name: str) -> Any:
    return json.loads((FIX / name).read_text())


def raw(name: str) -> bytes:
    return (FIX / name).read_bytes()


def closed(frame: dict[str, Any]) -> dict[str, Any]:
    """A copy of a kline event (raw or enveloped) marked closed."""
    frame = json.loads(json.dumps(frame))
    data = frame.get("data", frame)
    data["k"]["x"] = True
    return frame


def only_data(frame: dict[str, Any]) -> dict[str, Any]:
    return frame.get("data", frame)


# -- trades ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ws_trade-official-docs.json", "ws_spot_trade-nautilus.json"])
def test_trade_frames_parse_without_loss(name: str) -> None:
    d = only_data(load(name))
    parsed = bm.parse_frame(raw(name))
    tick = parsed.message
    assert isinstance(tick, Tick)
    assert parsed.event == "trade"
    assert tick.symbol == d["s"]
    assert tick.trade_id == d["t"]
    assert tick.price == Decimal(d["p"]) and str(tick.price) == d["p"]
    assert tick.qty == Decimal(d["q"]) and str(tick.qty) == d["q"]
    assert tick.ts_event == d["T"] * 1_000_000
    assert tick.ts_init == tick.ts_event
    assert tick.id == f"tick:{d['s']}:{d['t']}"
    # m true: the buyer was the maker, so the seller was the aggressor.
    assert tick.side == ("SELL" if d["m"] else "BUY")
    assert codec.decode(codec.encode(tick)) == tick


def test_nautilus_trade_envelope_keeps_stream_name() -> None:
    parsed = bm.parse_frame(raw("ws_spot_trade-nautilus.json"), ts_init=123)
    assert parsed.stream == "ethusdt@trade"
    assert parsed.message is not None and parsed.message.ts_init == 123


@pytest.mark.parametrize(
    "name",
    [
        "ws_aggTrade-official-docs.json",
        "ws_spot_agg_trade-nautilus.json",
        "ws_aggTrade-cryptofeed.json",
    ],
)
def test_agg_trade_frames_parse_without_loss(name: str) -> None:
    d = only_data(load(name))
    parsed = bm.parse_frame(raw(name))
    tick = parsed.message
    assert isinstance(tick, Tick)
    assert parsed.event == "aggTrade"
    assert tick.trade_id == d["a"]
    assert str(tick.price) == d["p"] and str(tick.qty) == d["q"]
    assert tick.side == ("SELL" if d["m"] else "BUY")
    assert tick.id == f"aggtick:{d['s']}:{d['a']}"
    assert tick.ts_event == d["T"] * 1_000_000


def test_buyer_taker_is_buy() -> None:
    d = load("ws_trade-official-docs.json")
    d["m"] = False
    tick = bm.parse_frame(json.dumps(d)).message
    assert isinstance(tick, Tick) and tick.side == "BUY"


# -- klines ------------------------------------------------------------------------------

KLINE_FILES = [
    "ws_kline-official-docs.json",
    "ws_kline-timezone-offset-official-docs.json",
    "ws_kline-cryptofeed.json",
]


@pytest.mark.parametrize("name", KLINE_FILES)
def test_open_kline_is_not_a_candle(name: str) -> None:
    assert only_data(load(name))["k"]["x"] is False  # recorded while forming
    parsed = bm.parse_frame(raw(name))
    assert parsed.event == "kline"
    assert parsed.message is None


@pytest.mark.parametrize("name", KLINE_FILES)
def test_closed_kline_parses_without_loss(name: str) -> None:
    frame = closed(load(name))
    k = only_data(frame)["k"]
    c = bm.parse_frame(json.dumps(frame).encode()).message
    assert isinstance(c, Candle)
    assert (c.symbol, c.interval, c.open_time, c.close_time) == (k["s"], k["i"], k["t"], k["T"])
    assert [str(c.open), str(c.high), str(c.low), str(c.close), str(c.volume)] == [
        k["o"],
        k["h"],
        k["l"],
        k["c"],
        k["v"],
    ]
    assert str(c.quote_volume) == k["q"]
    assert c.trades == k["n"]
    assert c.ts_event == k["T"] * 1_000_000
    assert c.id == f"candle:{k['s']}:{k['i']}:{k['t']}"
    assert c.source == "ws"


def test_combined_session_recording() -> None:
    """Every frame of a recorded combined-stream session parses; only trades give ticks."""
    kinds: dict[str, int] = {}
    for line in (FIX / "ws_combined_stream_session-cryptofeed.jsonl").read_bytes().splitlines():
        parsed = bm.parse_frame(line)
        assert parsed.stream
        kinds[type(parsed.message).__name__] = kinds.get(type(parsed.message).__name__, 0) + 1
        if parsed.event == "aggTrade":
            assert isinstance(parsed.message, Tick)
        else:
            assert parsed.message is None  # depth, bookTicker, forming klines
    assert kinds["Tick"] == 2
    assert kinds["NoneType"] > 200


def test_rest_klines_parse_without_loss() -> None:
    for name, symbol in (
        ("http_spot_market_klines-nautilus.json", "BTCUSDT"),
        ("GET_api_v3_klines-official-docs.json", "BNBBTC"),
    ):
        rows = load(name)
        candles = bm.parse_klines(raw(name), symbol, "1m")
        assert len(candles) == len(rows) > 0
        for row, c in zip(rows, candles, strict=True):
            assert len(row) == 12
            assert c.open_time == row[0] and c.close_time == row[6]
            assert [str(c.open), str(c.high), str(c.low), str(c.close), str(c.volume)] == row[1:6]
            assert str(c.quote_volume) == row[7] and c.trades == row[8]
            assert c.id == f"candle:{symbol}:1m:{row[0]}"
            assert c.ts_event == row[6] * 1_000_000
            assert c.source == "rest"


def test_ws_and_rest_forms_of_one_candle_share_id_and_values() -> None:
    row = load("http_spot_market_klines-nautilus.json")[0]
    frame = {
        "stream": "btcusdt@kline_1m",
        "data": {
            "e": "kline",
            "E": row[6] + 5,
            "s": "BTCUSDT",
            "k": {
                "t": row[0],
                "T": row[6],
                "s": "BTCUSDT",
                "i": "1m",
                "f": 1,
                "L": 2,
                "o": row[1],
                "c": row[4],
                "h": row[2],
                "l": row[3],
                "v": row[5],
                "n": row[8],
                "x": True,
                "q": row[7],
                "V": row[9],
                "Q": row[10],
                "B": "0",
            },
        },
    }
    ws = bm.parse_frame(json.dumps(frame)).message
    rest = bm.kline_row_to_candle(row, "btcusdt", "1m")
    assert isinstance(ws, Candle)
    assert ws.id == rest.id
    assert ws.ts_event == rest.ts_event
    assert {
        f: getattr(ws, f)
        for f in ("open", "high", "low", "close", "volume", "quote_volume", "trades")
    } == {
        f: getattr(rest, f)
        for f in ("open", "high", "low", "close", "volume", "quote_volume", "trades")
    }


def test_subscription_ack_and_other_events_are_ignored() -> None:
    assert bm.parse_frame(b'{"result":null,"id":1}').message is None
    assert (
        bm.parse_frame(raw("ws_combined_stream_session-cryptofeed.jsonl").splitlines()[0]).message
        is None
    )


# -- malformed ---------------------------------------------------------------------------


def _mutated_trade(mutate: Callable[[dict[str, Any]], None]) -> bytes:
    frame = load("ws_spot_trade-nautilus.json")
    mutate(frame["data"])
    return json.dumps(frame).encode()


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"not json at all", "invalid JSON"),
        (b"[1,2,3]", "not an object"),
        (b'{"foo": 1}', "neither"),
        (b'{"stream": "x@trade", "data": 5}', "'data' is not an object"),
        (_mutated_trade(lambda d: d.pop("p")), "trade"),
        (_mutated_trade(lambda d: d.__setitem__("p", 4149.74)), "trade"),  # number, not string
        (_mutated_trade(lambda d: d.__setitem__("q", "abc")), "not a decimal"),
        (_mutated_trade(lambda d: d.__setitem__("p", "NaN")), "not finite"),
        (_mutated_trade(lambda d: d.__setitem__("t", "705291099")), "trade"),
    ],
)
def test_malformed_frames_carry_raw_and_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(bm.MalformedFrame) as info:
        bm.parse_frame(payload)
    assert info.value.raw == payload
    assert reason in info.value.reason


def test_malformed_kline_rows() -> None:
    row = load("http_spot_market_klines-nautilus.json")[0]
    with pytest.raises(bm.MalformedFrame, match="expected a list"):
        bm.kline_row_to_candle(row[:5], "BTCUSDT", "1m")
    bad = list(row)
    bad[1] = 60685.22
    with pytest.raises(bm.MalformedFrame, match="open is not a decimal string"):
        bm.kline_row_to_candle(bad, "BTCUSDT", "1m")
    with pytest.raises(bm.MalformedFrame, match="not a list"):
        bm.parse_klines(b'{"code":-1121}', "BTCUSDT", "1m")


def test_stream_names_and_intervals() -> None:
    assert bm.trade_stream("BTCUSDT") == "btcusdt@trade"
    assert bm.kline_stream("BTCUSDT", "1m") == "btcusdt@kline_1m"
    assert bm.combined_stream_url("ws://h:1/", ["a@trade", "a@kline_1m"]) == (
        "ws://h:1/stream?streams=a@trade/a@kline_1m"
    )
    assert bm.interval_ms("1m") == 60_000
    with pytest.raises(ValueError, match="unsupported"):
        bm.interval_ms("7m")


# -- fetch_klines against a real HTTP server ------------------------------------------------

T0 = 1_774_267_740_000


def make_row(i: int) -> list[Any]:
    ot = T0 + i * 60_000
    return [
        ot,
        f"{70000 + i}.01",
        f"{70010 + i}.5",
        f"{69990 + i}.25",
        f"{70001 + i}.75",
        "1.00012345",
        ot + 59_999,
        "70000.1",
        10 + i,
        "0.5",
        "35000.05",
        "0",
    ]


class KlineServer:
    def __init__(self, n: int) -> None:
        self.rows = [make_row(i) for i in range(n)]
        self.requests: list[dict[str, str]] = []
        self.fail_next: list[tuple[int, dict[str, str]]] = []

    async def handle(self, request: web.Request) -> web.Response:
        q = dict(request.query)
        self.requests.append(q)
        if self.fail_next:
            status, headers = self.fail_next.pop(0)
            return web.json_response(
                {"code": -1003, "msg": "Too many requests."}, status=status, headers=headers
            )
        if q.get("symbol") != "BTCUSDT":
            return web.json_response({"code": -1121, "msg": "Invalid symbol."}, status=400)
        start = int(q.get("startTime", "0"))
        end = int(q["endTime"]) if "endTime" in q else None
        limit = int(q.get("limit", "500"))
        rows = [r for r in self.rows if r[0] >= start and (end is None or r[0] <= end)]
        return web.json_response(rows[:limit])


@pytest.fixture
async def kline_server() -> AsyncIterator[tuple[KlineServer, str]]:
    srv = KlineServer(2500)
    app = web.Application()
    app.router.add_get("/api/v3/klines", srv.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield srv, f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def test_fetch_klines_pages_until_range_is_covered(
    kline_server: tuple[KlineServer, str],
) -> None:
    srv, url = kline_server
    async with aiohttp.ClientSession() as session:
        candles = await bm.fetch_klines(session, url, "btcusdt", "1m", T0, T0 + 2199 * 60_000)
    assert [c.open_time for c in candles] == [T0 + i * 60_000 for i in range(2200)]
    assert len(srv.requests) == 3
    assert all(r["limit"] == "1000" for r in srv.requests)
    assert candles[1234] == bm.kline_row_to_candle(
        make_row(1234), "BTCUSDT", "1m", ts_init=candles[1234].ts_init
    )


async def test_fetch_klines_open_ended_stops_at_the_newest(
    kline_server: tuple[KlineServer, str],
) -> None:
    srv, url = kline_server
    async with aiohttp.ClientSession() as session:
        candles = await bm.fetch_klines(session, url, "BTCUSDT", "1m", T0 + 500 * 60_000, None)
    assert len(candles) == 2000
    assert candles[-1].open_time == srv.rows[-1][0]


async def test_fetch_klines_classifies_errors_and_honors_retry_after(
    kline_server: tuple[KlineServer, str],
) -> None:
    srv, url = kline_server
    async with aiohttp.ClientSession() as session:
        with pytest.raises(bm.ClientRequestError) as info:
            await bm.fetch_klines(session, url, "NOPE", "1m", T0, T0)
        assert info.value.status == 400 and info.value.code == -1121

        srv.fail_next = [(429, {"Retry-After": "0"})]
        candles = await bm.fetch_klines(session, url, "BTCUSDT", "1m", T0, T0 + 60_000)
        assert len(candles) == 2  # retried after Retry-After, then served

        srv.fail_next = [(429, {})]
        with pytest.raises(bm.RateLimited) as rl:
            await bm.fetch_klines(session, url, "BTCUSDT", "1m", T0, T0)
        assert rl.value.code == -1003 and rl.value.retry_after_s is None

        srv.fail_next = [(418, {"Retry-After": "3600"})]
        with pytest.raises(bm.IpBanned) as ban:
            await bm.fetch_klines(session, url, "BTCUSDT", "1m", T0, T0)
        assert ban.value.retry_after_s == 3600.0

        srv.fail_next = [(502, {})]
        with pytest.raises(bm.ServerError):
            await bm.fetch_klines(session, url, "BTCUSDT", "1m", T0, T0)


# -- the whole recorded session, classified -----------------------------------------------

SHARED_SESSION = Path(
    "/work/shared/data/binance-payloads/recorded/cryptofeed-2021-10-12/ws_combined_stream_session.jsonl"
)


def test_recorded_session_parses_without_loss_every_message_classified() -> None:
    """All 265 frames of the real session: aggTrade/kline parsed, depth/bookTicker
    recognised and skipped, none malformed (the fast typed path and the general path agree)."""
    data = (FIX / "ws_combined_stream_session-cryptofeed.jsonl").read_bytes()
    if SHARED_SESSION.exists():
        assert data == SHARED_SESSION.read_bytes()  # the fixture is the recording, unchanged
    kinds: dict[str, int] = {}
    lines = data.splitlines()
    for line in lines:
        obj = json.loads(line)
        parsed = bm.parse_frame(line)  # raises MalformedFrame on any loss
        assert parsed.stream == obj["stream"]
        event = obj["data"].get("e", "bookTicker" if "b" in obj["data"] else "?")
        kinds[event] = kinds.get(event, 0) + 1
        if event == "aggTrade":
            tick = parsed.message
            assert isinstance(tick, Tick)
            d = obj["data"]
            assert (tick.trade_id, str(tick.price), str(tick.qty)) == (d["a"], d["p"], d["q"])
            assert tick.ts_event == d["T"] * 1_000_000
            assert parsed.trades == d["l"] - d["f"] + 1
        elif event == "kline":
            assert parsed.event == "kline" and parsed.message is None  # still forming
            closed_frame = closed(obj)
            candle = bm.parse_frame(json.dumps(closed_frame)).message
            assert isinstance(candle, Candle) and candle.trades == obj["data"]["k"]["n"]
        else:
            assert parsed.message is None
    assert len(lines) == 265
    assert kinds == {"depthUpdate": 177, "bookTicker": 84, "aggTrade": 2, "kline": 2}


def test_fast_and_general_paths_agree() -> None:
    """The typed one-pass decoder and the general path give identical messages."""
    for name in (
        "ws_trade-official-docs.json",
        "ws_spot_trade-nautilus.json",
        "ws_aggTrade-cryptofeed.json",
        "ws_kline-cryptofeed.json",
    ):
        frame = load(name)
        if "k" in only_data(frame):
            frame = closed(frame)
        body = json.dumps(frame).encode()
        assert bm.parse_frame(body, ts_init=1) == bm._parse_general(body, 1)


class FakeClock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_rest_limiter_window_arithmetic() -> None:
    clock = FakeClock(1000.0)  # window [960, 1020)
    lim = bm.RestLimiter(100, fraction=0.8, clock=clock)
    assert lim.budget == 80 and lim.delay(2) == 0
    lim.observe({"X-MBX-USED-WEIGHT-1M": "79"})
    assert lim.delay(1) == 0
    assert lim.delay(2) == pytest.approx(20.001)  # to the next calendar minute
    clock.t = 1020.5
    assert lim.delay(2) == 0 and lim.used == 0  # a new window
    lim.rate_limited(5.0)
    assert lim.delay(1) == pytest.approx(5.0)
    lim.banned(None)
    assert lim.delay(1) == pytest.approx(bm.DEFAULT_BACKOFF_S)
