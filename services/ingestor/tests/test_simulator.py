"""The ingestor against the project's Binance-compatible simulator (replayed real candles)."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest
import redis.asyncio as aioredis
from ingestor_factories import expected, real_candles

from gridstream.common import codec
from gridstream.common.messages import Candle, Tick
from gridstream.common.runtime import Runtime
from gridstream.common.streams import Kind, Service, stream
from gridstream.ingestor.main import Ingestor, IngestorSettings

sim_server = pytest.importorskip("gridstream.simulator.server")
sim_settings = pytest.importorskip("gridstream.simulator.settings")

SYMBOL = "BTCUSDT"


async def test_ingestor_against_the_simulator(redis_url: str, database_url: str) -> None:
    rows = real_candles(SYMBOL, 400)
    start_ms = int(rows[300]["open_time_ms"])
    sim = sim_settings.SimSettings(
        host="127.0.0.1", port=0, symbols=(SYMBOL,), start_ms=start_ms, hours=1.0, speed=240.0
    )
    runner, base = await sim_server.start(sim)
    host = base.split("://", 1)[1].rstrip("/")
    settings = IngestorSettings(
        redis_url=redis_url,
        database_url=database_url,
        symbols=[SYMBOL],
        venue_rest_url=f"http://{host}",
        venue_ws_url=f"ws://{host}",
        backfill_candles=20,
        reconnect_initial_s=0.05,
        reconnect_max_s=0.2,
        log_format="text",
    )
    rt = Runtime(Service.INGESTOR, settings)
    r = aioredis.Redis.from_url(redis_url)
    try:
        await rt.start(database=True)
        task = asyncio.create_task(Ingestor(rt, settings).run())
        deadline = time.monotonic() + 30
        sources: list[str] = []
        while time.monotonic() < deadline:
            db_rows = await candle_rows(database_url)
            sources = [x["source"] for x in db_rows]
            if sources.count("ws") >= 3 and await r.xlen(stream(Kind.TICKS, SYMBOL)) > 0:
                break
            await asyncio.sleep(0.2)
        rt.request_stop()
        await asyncio.wait_for(task, 10)
        # the table once the ingestor has stopped: it may have written a candle after the
        # last look above (and published it: a candle goes to Postgres, then to the stream)
        db_rows = await candle_rows(database_url)
        sources = [x["source"] for x in db_rows]
        assert sources.count("rest") >= 1 and sources.count("ws") >= 3
        # contiguous (no gap, no duplicate) and equal to the real source candles
        by_open = {int(x["open_time_ms"]): x for x in rows}
        opens = [x["open_time"] for x in db_rows]
        assert opens == list(range(opens[0], opens[-1] + 60_000, 60_000))
        for x in db_rows:
            assert {k: x[k] for k in expected(by_open[x["open_time"]])} == expected(
                by_open[x["open_time"]]
            )
        published = [
            codec.decode(f[codec.FIELD]) for _i, f in await r.xrange(stream(Kind.CANDLES, SYMBOL))
        ]
        assert all(isinstance(m, Candle) for m in published)
        assert [m.open_time for m in published] == opens
        ticks = [
            codec.decode(f[codec.FIELD]) for _i, f in await r.xrange(stream(Kind.TICKS, SYMBOL))
        ]
        assert all(isinstance(t, Tick) for t in ticks)
        ids = [t.trade_id for t in ticks]
        assert ids == sorted(set(ids))
    finally:
        await rt.close()
        await r.aclose()
        await runner.cleanup()


async def candle_rows(database_url: str) -> list[asyncpg.Record]:
    """The candles table, oldest first."""
    conn = await asyncpg.connect(database_url)
    try:
        return await conn.fetch("SELECT * FROM candles ORDER BY open_time")
    finally:
        await conn.close()
