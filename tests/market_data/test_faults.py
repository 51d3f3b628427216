"""Market data under faults: the real ingestor against the project's simulator replaying
real Binance candles, with real Redis and Postgres.

* 50 websocket drops during a 2-day replay: Postgres ends with every candle exactly once,
  equal to the source file;
* a silent connection is detected and replaced; repeated frames change nothing;
* a malformed frame is dead-lettered and the feed goes on.
"""

from __future__ import annotations

import asyncio
import csv
import gzip
import time
from collections.abc import Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from gridstream.common import codec
from gridstream.common.messages import Candle
from gridstream.common.runtime import Runtime
from gridstream.common.streams import Kind, Service, stream
from gridstream.ingestor.main import Ingestor, IngestorSettings

sim_server = pytest.importorskip("gridstream.simulator.server")
sim_settings = pytest.importorskip("gridstream.simulator.settings")
if not hasattr(sim_settings, "FaultSpec"):
    pytest.skip("the simulator has no fault mode", allow_module_level=True)

REPO = Path(__file__).resolve().parents[2]
SYMBOL = "BTCUSDT"
DAY_MS = 86_400_000


def source_rows(first: int, n: int) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    with gzip.open(REPO / "data" / "klines" / f"{SYMBOL}-1m.csv.gz", "rt") as fh:
        for i, row in enumerate(csv.DictReader(fh)):
            if i >= first:
                out.append(row)
            if len(out) == n:
                break
    return out


async def wait_until(cond: Callable[[], Awaitable[bool]], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await cond():
            return
        await asyncio.sleep(0.1)
    raise AssertionError("condition not met in time")


class Stack:
    """The simulator (in process) and the ingestor wiring, in this event loop."""

    def __init__(self, redis_url: str, database_url: str, sim: Any, **ingestor: Any) -> None:
        self.sim_cfg = sim
        self.redis_url = redis_url
        self.database_url = database_url
        self.ingestor_kw = ingestor

    async def __aenter__(self) -> Stack:
        self.runner, base = await sim_server.start(self.sim_cfg)
        self.base = base.rstrip("/")
        host = self.base.split("://", 1)[1]
        args: dict[str, Any] = dict(
            redis_url=self.redis_url,
            database_url=self.database_url,
            symbols=[SYMBOL],
            venue_rest_url=f"http://{host}",
            venue_ws_url=f"ws://{host}",
            backfill_candles=10,
            reconnect_initial_s=0.02,
            reconnect_max_s=0.1,
            silence_timeout_s=5.0,
            log_format="text",
        )
        args.update(self.ingestor_kw)
        self.settings = IngestorSettings(**args)
        self.rt = Runtime(Service.INGESTOR, self.settings)
        await self.rt.start(database=True)
        self.ingestor = Ingestor(self.rt, self.settings)
        self.task = asyncio.create_task(self.ingestor.run())
        self.http = aiohttp.ClientSession()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.rt.request_stop()
        await asyncio.wait_for(self.task, 15)
        await self.rt.close()
        await self.http.close()
        await self.runner.cleanup()

    async def status(self) -> dict[str, Any]:
        async with self.http.get(f"{self.base}/sim/status") as resp:
            data: dict[str, Any] = await resp.json()
            return data

    async def fault(self, **body: Any) -> dict[str, Any]:
        async with self.http.post(f"{self.base}/sim/fault", json=body) as resp:
            data: dict[str, Any] = await resp.json()
            return data

    async def candles(self) -> list[asyncpg.Record]:
        conn = await asyncpg.connect(self.database_url)
        try:
            return await conn.fetch("SELECT * FROM candles ORDER BY open_time")
        finally:
            await conn.close()


def assert_equal_to_source(rows: list[asyncpg.Record], src: list[dict[str, str]]) -> None:
    by_open = {int(r["open_time_ms"]): r for r in src}
    opens = [r["open_time"] for r in rows]
    assert opens == sorted(set(opens))  # each exactly once (the key forbids it anyway)
    assert opens == list(range(opens[0], opens[-1] + 60_000, 60_000))  # no hole
    for r in rows:
        s = by_open[r["open_time"]]
        assert (r["open"], r["high"], r["low"], r["close"], r["volume"]) == tuple(
            Decimal(s[k]) for k in ("open", "high", "low", "close", "volume")
        ), r["open_time"]


@pytest.mark.e2e
@pytest.mark.timeout(600)  # 48 s of replay at best; much more on a loaded machine
async def test_50_drops_in_a_2_day_replay_lose_and_double_nothing(
    redis_url: str, database_url: str
) -> None:
    src = source_rows(990, 2 * 1440 + 20)
    start = int(src[10]["open_time_ms"])  # the 10 before it are the start-up backfill
    sim = sim_settings.SimSettings(
        host="127.0.0.1",
        port=0,
        symbols=(SYMBOL,),
        start_ms=start,
        hours=48.0,
        speed=3600.0,  # 2 days in 48 s
        trades_per_candle=4,
        faults=(sim_settings.FaultSpec("drop-every", 57),),  # 2880 // 57 = 50 drops
    )
    last_open = start + 2 * DAY_MS - 60_000
    async with Stack(redis_url, database_url, sim) as st:

        async def replayed() -> bool:
            rows = await st.candles()
            return bool(rows) and rows[-1]["open_time"] == last_open

        await wait_until(replayed, timeout=500)
        status = await st.status()
        rows = await st.candles()
        published = [
            codec.decode(f[codec.FIELD])
            for _i, f in await st.rt.redis.xrange(stream(Kind.CANDLES, SYMBOL))
        ]
        connections = st.ingestor.connections
    drops = [f for f in status["faults"] if f["kind"] == "drop"]
    assert len(drops) == 50
    assert sum(1 for f in drops if f["affected"] > 0) >= 45  # most hit a live connection
    assert connections >= 46
    # the start-up backfill is the 10 newest closed candles when the ingestor first caught
    # up: those before the window's start, or later ones if the replay (a minute every
    # 17 ms, from the first subscription on) ran ahead while it was catching up
    first = rows[0]["open_time"]
    assert start - 10 * 60_000 <= first < start + DAY_MS and rows[-1]["open_time"] == last_open
    assert [r["source"] for r in rows[:10]] == ["rest"] * 10
    assert len(rows) == (last_open - first) // 60_000 + 1
    assert_equal_to_source(rows, src)
    sources = {r["source"] for r in rows}
    assert sources == {"ws", "rest"}  # live, and backfilled after the drops
    # the candle stream: each candle exactly once, in order, the same as Postgres
    assert all(isinstance(m, Candle) for m in published)
    assert [m.open_time for m in published] == [r["open_time"] for r in rows]


async def test_silence_is_detected_and_replaced_and_repeats_change_nothing(
    redis_url: str, database_url: str
) -> None:
    src = source_rows(2990, 410)
    start = int(src[10]["open_time_ms"])
    sim = sim_settings.SimSettings(
        host="127.0.0.1",
        port=0,
        symbols=(SYMBOL,),
        start_ms=start,
        hours=5.0,
        speed=600.0,  # a minute every 0.1 s
        trades_per_candle=4,
    )
    async with Stack(redis_url, database_url, sim, silence_timeout_s=0.6) as st:
        await wait_until(lambda: asyncio.sleep(0, st.rt.ready), timeout=60)
        await wait_until(lambda: _count_at_least(st, 10), timeout=60)
        # repeated frames: the last 50 frames sent again, twice
        assert (await st.fault(kind="repeat", frames=50))["ok"]
        assert (await st.fault(kind="repeat", frames=50))["ok"]
        before = st.ingestor.connections
        assert (await st.fault(kind="silence", seconds=3))["ok"]
        await wait_until(lambda: asyncio.sleep(0, st.ingestor.connections > before), timeout=60)
        n = len(await st.candles())
        # on the stream, which is what is asserted: the table can be one candle ahead of it
        await wait_until(lambda: _published_at_least(st, n + 10), timeout=60)
        # the stream first: a candle is written to Postgres before it is published, so
        # the rows read after it hold every published candle (and maybe a newer one)
        ticks = [
            codec.decode(f[codec.FIELD]).trade_id  # type: ignore[union-attr]
            for _i, f in await st.rt.redis.xrange(stream(Kind.TICKS, SYMBOL))
        ]
        published = [
            codec.decode(f[codec.FIELD]).open_time  # type: ignore[union-attr]
            for _i, f in await st.rt.redis.xrange(stream(Kind.CANDLES, SYMBOL))
        ]
        rows = await st.candles()
    assert st.ingestor.engine.duplicates > 0  # the repeats reached the engine ...
    assert_equal_to_source(rows, src)  # ... and changed nothing
    assert published == [r["open_time"] for r in rows][: len(published)]
    assert len(published) >= n + 10
    assert ticks == sorted(set(ticks))


async def _count_at_least(st: Stack, n: int) -> bool:
    return len(await st.candles()) >= n


async def _published_at_least(st: Stack, n: int) -> bool:
    return int(await st.rt.redis.xlen(stream(Kind.CANDLES, SYMBOL))) >= n


XRPETH_AGG = (
    Path(__file__).resolve().parents[3]
    / "shared"
    / "data"
    / "trades"
    / "XRPETH-aggTrades-2019-10-11_2019-10-13.csv"
)


@pytest.mark.skipif(not XRPETH_AGG.exists(), reason="shared trade data not present")
async def test_candles_built_from_real_aggtrades_agree_with_the_venue_klines(
    redis_url: str, database_url: str
) -> None:
    """The simulator replays the real XRPETH aggTrades file and builds its klines the way
    Binance does; the ingestor builds candles from the same aggTrades and compares."""
    from prometheus_client import REGISTRY

    def checks(result: str) -> float:
        labels = {"service": "ingestor", "symbol": "XRPETH", "result": result}
        return REGISTRY.get_sample_value("gridstream_candle_checks_total", labels) or 0.0

    agree0, differ0 = checks("agree"), checks("differ")
    sim = sim_settings.SimSettings(
        host="127.0.0.1",
        port=0,
        symbols=("XRPETH",),
        files={"XRPETH": str(XRPETH_AGG)},
        filters={"XRPETH": sim_settings.FilterSpec(tick=Decimal("0.00000001"), step=Decimal("1"))},
        start_ms=1570752000000,  # 2019-10-11 00:00 UTC
        hours=6.0,
        speed=1800.0,
    )
    async with Stack(redis_url, database_url, sim, symbols=["XRPETH"], trade_stream="aggTrade"):
        await wait_until(lambda: asyncio.sleep(0, checks("agree") - agree0 >= 100), timeout=90)
        differ = checks("differ") - differ0
        agree = checks("agree") - agree0
    assert agree >= 100 and differ == 0
