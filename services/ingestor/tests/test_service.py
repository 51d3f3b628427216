"""The real ingestor wiring against a small real Binance-like venue (aiohttp websocket + REST),
real Redis and real Postgres: exactly-once candles, streams, reconnect backfill, live gaps,
dead letters, crash recovery and the silence watchdog."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from aiohttp import WSMsgType, web
from ingestor_factories import expected, kline_frame, real_candles, rest_row, trades_in
from prometheus_client import REGISTRY

from gridstream.common import codec
from gridstream.common.binance.market import kline_row_to_candle
from gridstream.common.bus import DLQ_PAYLOAD, DLQ_REASON, DLQ_STREAM
from gridstream.common.messages import Candle, Tick
from gridstream.common.runtime import Runtime
from gridstream.common.streams import Kind, Service, dead_letters, stream
from gridstream.ingestor.main import Ingestor, IngestorSettings

SYMBOL = "BTCUSDT"
ROWS = real_candles(SYMBOL, 40)


def ot(i: int) -> int:
    return int(ROWS[i]["open_time_ms"])


class MiniVenue:
    """Binance's combined stream + /api/v3/klines + /api/v3/time over real candles.

    ``clock`` = how many candles of ``rows`` are closed; REST serves only those.
    """

    def __init__(self, rows: tuple[dict[str, str], ...], clock: int) -> None:
        self.rows = rows
        self.clock = clock
        self.sockets: list[web.WebSocketResponse] = []
        self.connections = 0
        self.stream_queries: list[str] = []
        self.kline_queries: list[dict[str, str]] = []

    async def klines(self, request: web.Request) -> web.Response:
        q = dict(request.query)
        self.kline_queries.append(q)
        if q.get("symbol") != SYMBOL or q.get("interval") != "1m":
            return web.json_response({"code": -1121, "msg": "Invalid symbol."}, status=400)
        limit = int(q.get("limit", "500"))
        closed = [rest_row(r) for r in self.rows[: self.clock]]
        if "endTime" in q:
            closed = [r for r in closed if r[0] <= int(q["endTime"])]
        if "startTime" in q:
            return web.json_response([r for r in closed if r[0] >= int(q["startTime"])][:limit])
        return web.json_response(closed[-limit:])

    async def server_time(self, _: web.Request) -> web.Response:
        return web.json_response(
            {"serverTime": int(self.rows[self.clock - 1]["close_time_ms"]) + 1}
        )

    async def ws(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.stream_queries.append(request.query_string)
        self.sockets.append(ws)
        self.connections += 1
        async for msg in ws:
            if msg.type == WSMsgType.ERROR:
                break
        return ws

    async def send(self, frames: list[bytes]) -> None:
        for ws in list(self.sockets):
            for frame in frames:
                await ws.send_str(frame.decode())

    async def drop(self) -> None:
        sockets, self.sockets = self.sockets, []
        for ws in sockets:
            await ws.close()


@pytest.fixture
async def venue() -> AsyncIterator[tuple[MiniVenue, str]]:
    v = MiniVenue(ROWS, clock=5)
    app = web.Application()
    app.router.add_get("/api/v3/klines", v.klines)
    app.router.add_get("/api/v3/time", v.server_time)
    app.router.add_get("/stream", v.ws)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield v, f"127.0.0.1:{port}"
    finally:
        await v.drop()
        await runner.cleanup()


def make_settings(redis_url: str, database_url: str, host: str, **kw: Any) -> IngestorSettings:
    args: dict[str, Any] = dict(
        redis_url=redis_url,
        database_url=database_url,
        symbols=[SYMBOL],
        venue_rest_url=f"http://{host}",
        venue_ws_url=f"ws://{host}",
        backfill_candles=3,
        reconnect_initial_s=0.05,
        reconnect_max_s=0.2,
        silence_timeout_s=10.0,
        log_format="text",
    )
    args.update(kw)
    return IngestorSettings(**args)


async def wait_until(cond: Callable[[], Awaitable[bool]], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await cond():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not met in time")


class Running:
    """The ingestor wiring running in this event loop."""

    def __init__(self, settings: IngestorSettings) -> None:
        self.settings = settings
        self.rt = Runtime(Service.INGESTOR, settings)
        self.ingestor = Ingestor(self.rt, settings)
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Running:
        await self.rt.start(database=True)
        self.task = asyncio.create_task(self.ingestor.run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.rt.request_stop()
        assert self.task is not None
        await asyncio.wait_for(self.task, 10)
        await self.rt.close()


async def stored(database_url: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(database_url)
    try:
        return await conn.fetch("SELECT * FROM candles ORDER BY open_time")
    finally:
        await conn.close()


async def stream_messages(r: aioredis.Redis, name: str) -> list[Any]:
    return [codec.decode(f[codec.FIELD]) for _id, f in await r.xrange(name)]


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_ingestor_end_to_end(
    venue: tuple[MiniVenue, str], redis_url: str, database_url: str
) -> None:
    v, host = venue
    r = aioredis.Redis.from_url(redis_url)
    candles_stream = stream(Kind.CANDLES, SYMBOL)
    ticks_stream = stream(Kind.TICKS, SYMBOL)
    gaps0 = metric("gridstream_gaps_total", service="ingestor", symbol=SYMBOL)
    gap_candles0 = metric("gridstream_gap_candles_total", service="ingestor", symbol=SYMBOL)
    reconnects0 = metric("gridstream_reconnects_total", service="ingestor", target="websocket")

    async def pg_max() -> int | None:
        rows = await stored(database_url)
        return rows[-1]["open_time"] if rows else None

    try:
        async with Running(make_settings(redis_url, database_url, host)) as run:
            await wait_until(lambda: asyncio.sleep(0, run.rt.ready))
            assert v.stream_queries == ["streams=btcusdt@trade/btcusdt@kline_1m"]
            # 1. empty Postgres: the newest 3 closed candles are backfilled
            assert [row["open_time"] for row in await stored(database_url)] == [ot(2), ot(3), ot(4)]

            # 2. live: trades, a forming candle, garbage, the closed candle twice, a
            #    repeated trade, more trades
            v.clock = 6
            frames = trades_in(ROWS[5], 1000, 4)
            frames += [
                kline_frame(ROWS[5], closed=False),
                b"this is not json",
                kline_frame(ROWS[5]),
                kline_frame(ROWS[5]),
                trades_in(ROWS[5], 1000, 1)[0],
            ]
            frames += trades_in(ROWS[6], 1004, 2)
            await v.send(frames)

            async def live_done() -> bool:
                return await pg_max() == ot(5) and await r.xlen(ticks_stream) == 6

            await wait_until(live_done)

            # 3. the connection drops; candles 6, 7, 8 close meanwhile
            v.clock = 9
            before = v.connections
            await v.drop()

            async def reconnected() -> bool:
                return v.connections > before and run.rt.ready and await pg_max() == ot(8)

            await wait_until(reconnected)

            # 4. live gap: candle 9 never arrives on the stream, 10 does
            v.clock = 11
            await v.send([kline_frame(ROWS[10]), *trades_in(ROWS[10], 1006, 1)])

            async def gap_done() -> bool:
                return await pg_max() == ot(10) and await r.xlen(ticks_stream) == 7

            await wait_until(gap_done)

        # Postgres: every candle 2..10 exactly once, equal to the source
        rows = await stored(database_url)
        assert [row["open_time"] for row in rows] == [ot(i) for i in range(2, 11)]
        for row, src in zip(rows, ROWS[2:11], strict=True):
            assert {k: row[k] for k in expected(src)} == expected(src)
            assert row["symbol"] == SYMBOL and row["interval"] == "1m"
        assert [row["source"] for row in rows] == ["rest"] * 3 + ["ws"] + ["rest"] * 4 + ["ws"]

        # Redis: candles in order, each once, identical to what Postgres holds
        published = await stream_messages(r, candles_stream)
        assert all(isinstance(m, Candle) for m in published)
        assert [m.open_time for m in published] == [ot(i) for i in range(2, 11)]
        assert [m.id for m in published] == [f"candle:{SYMBOL}:1m:{ot(i)}" for i in range(2, 11)]
        for m, row in zip(published, rows, strict=True):
            assert (m.open, m.high, m.low, m.close, m.volume) == (
                row["open"],
                row["high"],
                row["low"],
                row["close"],
                row["volume"],
            )
            assert m.ts_event == row["close_time"] * 1_000_000

        # ticks: each trade once, in order, aggressor side from `m`
        ticks = await stream_messages(r, ticks_stream)
        assert all(isinstance(t, Tick) for t in ticks)
        assert [t.trade_id for t in ticks] == list(range(1000, 1007))
        assert [t.side for t in ticks[:2]] == ["SELL", "BUY"]

        # the garbage frame was dead-lettered with its raw bytes, and the feed went on
        dlq = await r.xrange(dead_letters(Service.INGESTOR))
        assert len(dlq) == 1
        fields = dlq[0][1]
        assert fields[DLQ_PAYLOAD] == b"this is not json"
        assert fields[DLQ_REASON].startswith(b"malformed: invalid JSON")
        assert fields[DLQ_STREAM] == b"websocket"

        # metrics: the reconnect backfill (3 candles) and the live gap (1 candle)
        assert metric("gridstream_gaps_total", service="ingestor", symbol=SYMBOL) - gaps0 == 2
        assert (
            metric("gridstream_gap_candles_total", service="ingestor", symbol=SYMBOL) - gap_candles0
        ) == 4
        assert (
            metric("gridstream_reconnects_total", service="ingestor", target="websocket")
            - reconnects0
        ) >= 1
        # the live gap was filled with one bounded REST request for exactly the gap
        assert {
            "symbol": SYMBOL,
            "interval": "1m",
            "startTime": str(ot(9)),
            "endTime": str(ot(9)),
            "limit": "1000",
        } in v.kline_queries
    finally:
        await r.aclose()


async def test_restart_republishes_stored_but_unpublished_candles(
    venue: tuple[MiniVenue, str], redis_url: str, database_url: str
) -> None:
    """A crash between the Postgres upsert and the publish must not lose the publish."""
    v, host = venue
    v.clock = 7
    conn = await asyncpg.connect(database_url)
    try:
        await conn.executemany(
            "INSERT INTO candles (symbol, interval, open_time, close_time, open, high, low,"
            " close, volume, source) VALUES ($1, '1m', $2, $3, $4, $5, $6, $7, $8, 'ws')",
            [
                (
                    SYMBOL,
                    int(x["open_time_ms"]),
                    int(x["close_time_ms"]),
                    *[Decimal(x[k]) for k in ("open", "high", "low", "close", "volume")],
                )
                for x in ROWS[0:5]
            ],
        )
    finally:
        await conn.close()
    r = aioredis.Redis.from_url(redis_url)
    try:
        # the stream already has candles 0 and 1 (published before the crash)
        rest = [json.loads(json.dumps(rest_row(x))) for x in ROWS[0:2]]
        for row in rest:
            c = kline_row_to_candle(row, SYMBOL, "1m")
            await r.xadd(stream(Kind.CANDLES, SYMBOL), {codec.FIELD: codec.encode(c)})
        async with Running(make_settings(redis_url, database_url, host)) as run:
            await wait_until(lambda: asyncio.sleep(0, run.rt.ready))
        published = await stream_messages(r, stream(Kind.CANDLES, SYMBOL))
        # 2, 3, 4 republished from Postgres, then 5, 6 backfilled from REST
        assert [m.open_time for m in published] == [ot(i) for i in range(7)]
        assert [row["open_time"] for row in await stored(database_url)] == [ot(i) for i in range(7)]
    finally:
        await r.aclose()


async def test_silent_connection_is_reconnected(
    venue: tuple[MiniVenue, str], redis_url: str, database_url: str
) -> None:
    v, host = venue
    settings = make_settings(redis_url, database_url, host, silence_timeout_s=0.3)
    async with Running(settings):
        await wait_until(lambda: asyncio.sleep(0, v.connections >= 3), timeout=60)
