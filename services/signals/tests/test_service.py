"""Signals wiring against real Redis and Postgres: candles stream in, signals stream out."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import gzip
import time
from collections.abc import AsyncIterator
from decimal import Decimal
from functools import cache
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as aioredis

from gridstream.common import codec, db
from gridstream.common.bus import Consumer, Producer
from gridstream.common.messages import Candle, Signal
from gridstream.common.settings import SettingsError, load_settings
from gridstream.common.streams import Kind, Service, consumer, group, stream
from gridstream.signals.engine import SignalEngine
from gridstream.signals.main import SignalsService, SignalsSettings, amain

DATA = Path(__file__).resolve().parents[3] / "data" / "klines"
SYMBOL = "BTCUSDT"
COLUMNS = (
    "symbol",
    "interval",
    "open_time",
    "close_time",
    "open",
    "high",
    "low",
    "close",
    "volume",
)


@cache
def real_candles(n: int = 300) -> tuple[Candle, ...]:
    out = []
    with gzip.open(DATA / f"{SYMBOL}-1m.csv.gz", "rt") as f:
        for _, r in zip(range(n), csv.DictReader(f), strict=False):
            out.append(
                Candle(
                    id=f"candle:{SYMBOL}:1m:{r['open_time_ms']}",
                    ts_event=int(r["close_time_ms"]) * 1_000_000,
                    ts_init=int(r["close_time_ms"]) * 1_000_000,
                    symbol=SYMBOL,
                    interval="1m",
                    open_time=int(r["open_time_ms"]),
                    close_time=int(r["close_time_ms"]),
                    open=Decimal(r["open"]),
                    high=Decimal(r["high"]),
                    low=Decimal(r["low"]),
                    close=Decimal(r["close"]),
                    volume=Decimal(r["volume"]),
                )
            )
    return tuple(out)


def settings_for(redis_url: str, database_url: str) -> SignalsSettings:
    return SignalsSettings(
        redis_url=redis_url,
        database_url=database_url,
        symbols=[SYMBOL],
        block_ms=20,
        metrics_port=0,
        claim_interval_s=3600,
    )


def expected_signals(candles: tuple[Candle, ...]) -> dict[int, Signal]:
    eng = SignalEngine(SignalsSettings().params())
    return {s.open_time: s for c in candles for s in eng.on_candle(c)}


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    p = await db.create_pool(database_url)
    yield p
    await p.close()


async def store_candles(pool: asyncpg.Pool, candles: tuple[Candle, ...]) -> None:
    async with pool.acquire() as conn, conn.transaction():
        await db.copy_upsert(
            conn,
            "candles",
            COLUMNS,
            [
                (
                    c.symbol,
                    c.interval,
                    c.open_time,
                    c.close_time,
                    c.open,
                    c.high,
                    c.low,
                    c.close,
                    c.volume,
                )
                for c in candles
            ],
            key=("symbol", "interval", "open_time"),
        )


async def publish(redis: aioredis.Redis, candles: tuple[Candle, ...]) -> None:
    await Producer(redis).publish((stream(Kind.CANDLES, c.symbol), c) for c in candles)


async def published_signals(redis: aioredis.Redis) -> list[Signal]:
    out = []
    for _eid, fields in await redis.xrange(stream(Kind.SIGNALS, SYMBOL)):
        msg = codec.decode(fields[codec.FIELD])
        assert isinstance(msg, Signal)
        out.append(msg)
    return out


def make_consumer(redis: aioredis.Redis, service: SignalsService) -> Consumer:
    return Consumer(
        redis,
        group=group(Service.SIGNALS),
        consumer=consumer(Service.SIGNALS, "0"),
        streams=[stream(Kind.CANDLES, SYMBOL)],
        handler=service.handle,
        block_ms=20,
        claim_interval_s=3600,
    )


async def drain(c: Consumer) -> None:
    await c.ensure_groups()
    idle = 0
    while idle < 3:
        idle = 0 if await c.run_once() else idle + 1


async def test_handler_turns_stream_candles_into_signals(
    redis: aioredis.Redis, pool: asyncpg.Pool, redis_url: str, database_url: str
) -> None:
    candles = real_candles(120)
    service = SignalsService(settings_for(redis_url, database_url))
    assert await service.warm_up(pool, redis) == {SYMBOL: 0}
    await publish(redis, candles)
    await drain(make_consumer(redis, service))

    got = await published_signals(redis)
    want = expected_signals(candles)
    assert len(got) == 120 - service.engine.warmup + 1 == len(want)
    assert got == [want[s.open_time] for s in got]
    assert [s.open_time for s in got] == sorted(want)

    # A redelivered candle (e.g. re-read after a failed commit) gets the very same signal;
    # an old one, already gone from the recent cache's window of interest, gets nothing new.
    last = candles[-1]
    out = await service.handle([])
    assert out == []
    again = service.on_candle(last)
    assert again == [want[last.open_time]]
    assert service.on_candle(candles[0]) == []


async def test_warm_up_from_postgres_needs_no_fresh_warm_up(
    redis: aioredis.Redis, pool: asyncpg.Pool, redis_url: str, database_url: str
) -> None:
    candles = real_candles(230)
    await store_candles(pool, candles[:200])  # history the ingestor stored earlier
    await publish(redis, candles[200:])  # a new group reads the stream from its start
    service = SignalsService(settings_for(redis_url, database_url))
    assert await service.warm_up(pool, redis) == {SYMBOL: 200}
    await drain(make_consumer(redis, service))

    got = await published_signals(redis)
    want = expected_signals(candles)
    assert [s.open_time for s in got] == [c.open_time for c in candles[200:]]
    for s in got:
        assert s == want[s.open_time]


async def test_restart_resumes_after_the_last_published_signal(
    redis: aioredis.Redis, pool: asyncpg.Pool, redis_url: str, database_url: str
) -> None:
    candles = real_candles(200)
    settings = settings_for(redis_url, database_url)
    # First life: handles candles 0..150, then dies while 151..199 wait on the stream.
    first = SignalsService(settings)
    await first.warm_up(pool, redis)
    await publish(redis, candles[:151])
    await drain(make_consumer(redis, first))
    await publish(redis, candles[151:])
    await store_candles(pool, candles)  # Postgres has them all, ahead of the signals service

    # Second life: warm from Postgres up to the last published signal, then the stream.
    second = SignalsService(settings)
    assert await second.warm_up(pool, redis) == {SYMBOL: 151}
    await drain(make_consumer(redis, second))

    got = await published_signals(redis)
    want = expected_signals(candles)
    assert [s.open_time for s in got] == sorted(want)  # each candle's signal exactly once
    for s in got:
        assert s == want[s.open_time]


async def test_service_main_runs_end_to_end(
    redis: aioredis.Redis, pool: asyncpg.Pool, redis_url: str, database_url: str
) -> None:
    candles = real_candles(100)
    await store_candles(pool, candles[:70])
    task = asyncio.create_task(amain(settings_for(redis_url, database_url)))
    try:
        await publish(redis, candles[70:])
        deadline = time.monotonic() + 20
        got: list[Signal] = []
        while time.monotonic() < deadline and len(got) < 30:
            assert not task.done(), task
            await asyncio.sleep(0.05)
            got = await published_signals(redis)
        want = expected_signals(candles)
        assert [s.open_time for s in got] == [c.open_time for c in candles[70:]]
        assert all(s == want[s.open_time] for s in got)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def test_settings_from_env_and_invalid_values_named() -> None:
    s = load_settings(SignalsSettings, {"GS_EMA_PERIOD": "30", "GS_TREND_THRESHOLD": "0.3"})
    assert s.params().ema_period == 30
    assert s.params().trend_threshold == 0.3
    with pytest.raises(SettingsError, match="GS_EMA_PERIOD"):
        load_settings(SignalsSettings, {"GS_EMA_PERIOD": "0"})
    with pytest.raises(SettingsError, match="GS_WARMUP_CANDLES"):
        load_settings(SignalsSettings, {"GS_WARMUP_CANDLES": "10"})
