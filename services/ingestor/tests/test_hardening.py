"""The hardened ingestor against a real local venue, real Redis and real Postgres:
exchange halts (the real 2023-03-24 Binance halt), connection age, pings, backoff that
never gives up, and REST inside the request-weight budget with 429/418 respected."""

from __future__ import annotations

import asyncio
import csv
import random
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import asyncpg
import pytest
from ingestor_factories import FIXTURES, kline_frame, real_candles
from prometheus_client import REGISTRY
from venue import Venue, serve

from gridstream.common.binance import market as bm
from gridstream.common.runtime import Runtime
from gridstream.common.streams import Service
from gridstream.ingestor.main import Backoff, Ingestor, IngestorSettings

HALT_ROWS = tuple(csv.DictReader((FIXTURES / "BTCUSDT-1h-halt-2023-03-24.csv").open()))
H = {r["open_time_ms"]: i for i, r in enumerate(HALT_ROWS)}
T_11 = 1679655600000  # 2023-03-24 11:00 UTC
T_12 = T_11 + 3_600_000  # flat, zero volume: Binance did publish it
T_13 = T_12 + 3_600_000  # no candle: the halt
T_14 = T_13 + 3_600_000


def settings(redis_url: str, database_url: str, host: str, **kw: Any) -> IngestorSettings:
    args: dict[str, Any] = dict(
        redis_url=redis_url,
        database_url=database_url,
        symbols=["BTCUSDT"],
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
    def __init__(self, s: IngestorSettings) -> None:
        self.rt = Runtime(Service.INGESTOR, s)
        self.ingestor = Ingestor(self.rt, s)
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

    async def ready(self) -> bool:
        return self.rt.ready


async def fetch(database_url: str, sql: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(database_url)
    try:
        return await conn.fetch(sql)
    finally:
        await conn.close()


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def source_opens(upto: int) -> list[int]:
    return [int(r["open_time_ms"]) for r in HALT_ROWS[:upto]]


async def test_real_halt_is_recorded_on_catch_up_not_invented(
    redis_url: str, database_url: str
) -> None:
    """Stored up to 11:00, reconnect at 16:00: 12, 14, 15 are fetched, 13:00 is a halt."""
    v = Venue(HALT_ROWS, clock=H[str(T_11)] + 1, interval="1h")
    halts0 = metric("gridstream_halts_total", service="ingestor", symbol="BTCUSDT")
    async with (
        serve(v) as host,
        Running(settings(redis_url, database_url, host, intervals=["1h"])) as run,
    ):
        await wait_until(run.ready)
        v.clock = H[str(T_14)] + 3
        await v.drop()

        async def caught_up() -> bool:
            rows = await fetch(database_url, "SELECT max(open_time) AS m FROM candles")
            return bool(rows[0]["m"] == T_14 + 2 * 3_600_000 and run.rt.ready)

        await wait_until(caught_up)
        assert run.ingestor.engine.watermark("BTCUSDT", "1h") == T_14 + 2 * 3_600_000
    stored = await fetch(database_url, "SELECT * FROM candles ORDER BY open_time")
    want = [int(r["open_time_ms"]) for r in HALT_ROWS[H[str(T_11)] - 2 : H[str(T_14)] + 3]]
    assert [r["open_time"] for r in stored] == want
    assert T_13 not in want  # the source itself has no 13:00 candle: nothing was invented
    flat = next(r for r in stored if r["open_time"] == T_12)
    assert flat["volume"] == 0 and flat["open"] == flat["close"] == 28080
    halts = await fetch(database_url, "SELECT * FROM market_halts")
    assert [
        (h["symbol"], h["interval"], h["first_open_time"], h["last_open_time"]) for h in halts
    ] == [("BTCUSDT", "1h", T_13, T_13)]
    assert halts[0]["candles"] == 1
    assert metric("gridstream_halts_total", service="ingestor", symbol="BTCUSDT") - halts0 == 1


async def test_real_halt_is_recorded_on_a_live_gap(redis_url: str, database_url: str) -> None:
    v = Venue(HALT_ROWS, clock=H[str(T_12)] + 1, interval="1h")
    s = settings(redis_url, database_url, host="", intervals=["1h"])
    async with serve(v) as host:
        s = settings(redis_url, database_url, host, intervals=["1h"])
        async with Running(s) as run:
            await wait_until(run.ready)
            assert run.ingestor.engine.watermark("BTCUSDT", "1h") == T_12
            v.clock = H[str(T_14)] + 1
            await v.send([kline_frame(HALT_ROWS[H[str(T_14)]], interval="1h")])

            async def got_14() -> bool:
                rows = await fetch(database_url, "SELECT max(open_time) AS m FROM candles")
                return bool(rows[0]["m"] == T_14)

            await wait_until(got_14)
            assert run.ingestor.halts[-1].first_open_time == T_13
    # the gap 13:00 was asked for exactly, REST had nothing, the halt is recorded
    assert {"startTime": str(T_13), "endTime": str(T_13)}.items() <= v.kline_queries[-1].items()
    halts = await fetch(database_url, "SELECT first_open_time, last_open_time FROM market_halts")
    assert [tuple(h) for h in halts] == [(T_13, T_13)]
    opens = [
        r["open_time"]
        for r in await fetch(database_url, "SELECT open_time FROM candles ORDER BY 1")
    ]
    assert T_13 not in opens and opens[-2:] == [T_12, T_14]


ROWS = real_candles("BTCUSDT", 60)


async def test_old_connection_is_replaced_and_backfill_covers_the_switch(
    redis_url: str, database_url: str
) -> None:
    v = Venue(ROWS, clock=5)
    async with serve(v) as host:
        s = settings(redis_url, database_url, host, max_connection_age_s=0.4)
        async with Running(s) as run:
            await wait_until(run.ready)
            # candles close while connections are being replaced; none is sent on the stream
            for clock in range(6, 12):
                v.clock = clock
                # each candle closes across a connection replacement
                seen = v.connections
                await wait_until(lambda seen=seen: asyncio.sleep(0, v.connections > seen))
            assert v.connections >= 4

            async def complete() -> bool:
                rows = await fetch(database_url, "SELECT max(open_time) AS m FROM candles")
                return bool(rows[0]["m"] == int(ROWS[10]["open_time_ms"]))

            await wait_until(complete)
    opens = [
        r["open_time"]
        for r in await fetch(database_url, "SELECT open_time FROM candles ORDER BY 1")
    ]
    assert opens == [int(r["open_time_ms"]) for r in ROWS[2:11]]


async def test_server_pings_are_answered(redis_url: str, database_url: str) -> None:
    """aiohttp's heartbeat closes a connection whose pong does not come within 0.1 s."""
    v = Venue(ROWS, clock=5, heartbeat=0.1)
    async with serve(v) as host, Running(settings(redis_url, database_url, host)) as run:
        await wait_until(run.ready)
        # 15 pings sent, each answered in time (or aiohttp would have closed the socket)
        await wait_until(lambda: asyncio.sleep(0, v.pings >= 15), timeout=60)
        assert v.connections == 1 and run.rt.ready and len(v.sockets) == 1
        assert not v.sockets[0].closed


def test_backoff_is_capped_jittered_and_never_gives_up() -> None:
    b = Backoff(0.5, 30.0, random.Random(7))
    delays = [b.next() for _ in range(10_000)]
    assert all(0.25 <= d <= 30.0 for d in delays)
    assert max(delays[:3]) <= 2.0  # grows from the initial delay
    tail = delays[100:]
    assert max(tail) > 25 and min(tail) < 5  # capped, and jittered over the whole range
    assert len({round(d, 6) for d in tail}) > 9000
    b.reset()
    assert b.next() <= 0.5


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_reconnects_forever_until_the_venue_comes_back(
    redis_url: str, database_url: str
) -> None:
    port = free_port()
    host = f"127.0.0.1:{port}"
    label = dict(service="ingestor", target="websocket")
    r0 = metric("gridstream_reconnects_total", **label)
    async with Running(settings(redis_url, database_url, host, reconnect_max_s=0.1)) as run:
        await wait_until(
            lambda: asyncio.sleep(0, metric("gridstream_reconnects_total", **label) - r0 >= 10)
        )
        assert not run.rt.ready
        v = Venue(ROWS, clock=5)
        async with serve(v, port):
            await wait_until(run.ready)
            rows = await fetch(database_url, "SELECT count(*) AS n FROM candles")
            assert rows[0]["n"] == 3


# -- REST weight budget, 429 and 418 ----------------------------------------------------------

MANY = real_candles("BTCUSDT", 1200)


async def test_fetch_stays_inside_the_weight_budget() -> None:
    """30 pages of 40 candles, 2 weight each, with a venue limit of 10 per 0.25 s window:
    the limiter (80% of 10) never lets the venue answer 429."""
    v = Venue(MANY, clock=1200, weight_limit=10, window_s=0.25)
    limiter = bm.RestLimiter(10, fraction=0.8, window_s=0.25)
    async with serve(v) as host, aiohttp.ClientSession() as session:
        t0 = time.monotonic()
        got = await bm.fetch_klines(
            session,
            f"http://{host}",
            "BTCUSDT",
            "1m",
            int(MANY[0]["open_time_ms"]),
            int(MANY[-1]["open_time_ms"]),
            limit=40,
            limiter=limiter,
        )
        elapsed = time.monotonic() - t0
    assert [c.open_time for c in got] == [int(r["open_time_ms"]) for r in MANY]
    assert set(v.statuses) == {200} and len(v.statuses) == 30
    assert v.max_used <= 8
    assert limiter.waits >= 5 and elapsed >= 1.0  # it slowed down instead of hitting 429


async def test_a_hammering_client_without_the_limiter_gets_429() -> None:
    """The reference: without the limiter the same venue answers 429 and then bans."""
    v = Venue(MANY, clock=1200, weight_limit=10, window_s=5)
    async with serve(v) as host, aiohttp.ClientSession() as session:
        with pytest.raises(bm.RateLimited):
            await bm.fetch_klines(
                session, f"http://{host}", "BTCUSDT", "1m", 0, None, limit=40, retries=0
            )
    assert v.statuses == [200] * 5 + [429]


async def test_429_retry_after_is_respected() -> None:
    v = Venue(MANY, clock=1200)
    v.fail_next = [(429, {"Retry-After": "0.6"})]
    limiter = bm.RestLimiter()
    async with serve(v) as host, aiohttp.ClientSession() as session:
        t0 = time.monotonic()
        got = await bm.fetch_klines(
            session,
            f"http://{host}",
            "BTCUSDT",
            "1m",
            int(MANY[0]["open_time_ms"]),
            int(MANY[9]["open_time_ms"]),
            limiter=limiter,
        )
        elapsed = time.monotonic() - t0
    assert len(got) == 10
    assert v.statuses == [429, 200]  # exactly one retry, after the wait
    assert elapsed >= 0.6


async def test_418_stops_all_rest_until_its_time() -> None:
    v = Venue(MANY, clock=1200)
    limiter = bm.RestLimiter()
    url = "http://127.0.0.1:0"
    async with serve(v) as host, aiohttp.ClientSession() as session:
        url = f"http://{host}"
        # a short ban: waited out, then served
        v.fail_next = [(418, {"Retry-After": "0.5"})]
        t0 = time.monotonic()
        assert await bm.fetch_server_time(session, url, limiter=limiter) > 0
        assert time.monotonic() - t0 >= 0.5
        # a long ban: the call fails at once and nothing more is sent until it ends
        v.fail_next = [(418, {"Retry-After": "3600"})]
        with pytest.raises(bm.IpBanned):
            await bm.fetch_klines(session, url, "BTCUSDT", "1m", 0, None, limiter=limiter)
        sent = len(v.statuses)
        assert limiter.delay(bm.KLINES_WEIGHT) > 3500
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(
                bm.fetch_klines(session, url, "BTCUSDT", "1m", 0, None, limiter=limiter), 0.5
            )
        assert len(v.statuses) == sent
    assert v.statuses == [418, 200, 418]
