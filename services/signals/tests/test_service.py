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
    """Small windows (warm after 14 candles) and 5m signals built from the 1m candles."""
    return SignalsSettings(
        redis_url=redis_url,
        database_url=database_url,
        symbols=[SYMBOL],
        block_ms=20,
        metrics_port=0,
        claim_interval_s=3600,
        higher_intervals=["5m"],
        sma_period=5,
        ema_period=5,
        rsi_period=4,
        atr_period=4,
        bb_period=5,
        adx_period=4,
        donchian_period=5,
        vol_window=5,
        vwap_window=5,
        trend_lookback=2,
        regime_window=10,
        min_dwell=2,
        # the whole stored history: values equal a run over all of it (EMA/Wilder remember)
        warmup_candles=1000,
    )


Key = tuple[str, int]


def expected_signals(candles: tuple[Candle, ...]) -> dict[Key, Signal]:
    eng = settings_for("redis://x", "postgresql://x").engine()
    return {(s.interval, s.open_time): s for c in candles for s in eng.on_candle(c)}


def last_open(candles: tuple[Candle, ...]) -> int:
    return candles[-1].open_time


def keys(signals: list[Signal]) -> list[Key]:
    return [(s.interval, s.open_time) for s in signals]


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
    one = [s for s in got if s.interval == "1m"]
    five = [s for s in got if s.interval == "5m"]
    assert len(one) == 120 - service.engine.warmup + 1
    # the first bucket (12:05-12:09) has only its last minute and the last one is open:
    # 23 whole 5m candles
    whole = [
        c
        for c in candles
        if c.open_time % 300_000 == 0 and c.open_time + 240_000 <= last_open(candles)
    ]
    assert len(whole) == 23
    assert len(five) == 23 - service.engine.warmup + 1
    assert len(got) == len(want)
    assert got == [want[k] for k in keys(got)]
    assert sorted(keys(got)) == sorted(want)

    # A redelivered candle (e.g. re-read after a failed commit) gets the very same signals
    # (the 1m one and the 5m one it completed); a candle that produced none gets none.
    closing = next(c for c in candles if c.open_time == whole[-1].open_time + 240_000)
    assert (await service.handle([])) == []
    again = service.on_candle(closing)
    assert again == [want[("1m", closing.open_time)], want[("5m", whole[-1].open_time)]]
    assert service.on_candle(candles[-1]) == [want[("1m", candles[-1].open_time)]]
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
    assert [s.open_time for s in got if s.interval == "1m"] == [c.open_time for c in candles[200:]]
    assert [s.open_time for s in got if s.interval == "5m"] == sorted(
        t for iv, t in want if iv == "5m" and t + 240_000 >= candles[200].open_time
    )
    for s in got:
        assert s == want[(s.interval, s.open_time)]


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
    assert sorted(keys(got)) == sorted(want)  # each candle's signals exactly once
    assert len(keys(got)) == len(set(keys(got)))
    for s in got:
        assert s == want[(s.interval, s.open_time)]


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
        while time.monotonic() < deadline and len(got) < 36:
            assert not task.done(), task
            await asyncio.sleep(0.05)
            got = await published_signals(redis)
        want = expected_signals(candles)
        assert [s.open_time for s in got if s.interval == "1m"] == [
            c.open_time for c in candles[70:]
        ]
        assert len([s for s in got if s.interval == "5m"]) == 6
        assert all(s == want[(s.interval, s.open_time)] for s in got)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def test_settings_from_env_and_invalid_values_named() -> None:
    s = load_settings(
        SignalsSettings,
        {"GS_EMA_PERIOD": "30", "GS_ADX_ENTER": "30", "GS_HIGHER_INTERVALS": "15m,4h"},
    )
    assert s.params().ema_period == 30
    assert s.params().adx_enter == 30.0
    assert s.engine().higher == ("15m", "4h")
    # auto warm-up: enough 1m candles for 4h signals (a first partial bucket included)
    assert s.warmup_rows() == (s.params().warmup + 1) * 240
    assert load_settings(SignalsSettings, {"GS_HIGHER_INTERVALS": ""}).warmup_rows() == 259
    with pytest.raises(SettingsError, match="GS_EMA_PERIOD"):
        load_settings(SignalsSettings, {"GS_EMA_PERIOD": "0"})
    with pytest.raises(SettingsError, match="GS_ADX_EXIT"):
        load_settings(SignalsSettings, {"GS_ADX_EXIT": "40"})
    with pytest.raises(SettingsError, match="GS_HIGHER_INTERVALS"):
        load_settings(SignalsSettings, {"GS_HIGHER_INTERVALS": "7m"})
    with pytest.raises(SettingsError, match="GS_WARMUP_CANDLES"):
        load_settings(SignalsSettings, {"GS_WARMUP_CANDLES": "10"})
