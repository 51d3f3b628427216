"""Replicas that split symbols: three signals processes over five symbols, one SIGKILLed
in the middle of the replay. Every candle gives exactly one signal, in order, whichever
replica handled it, and the dead replica's symbols are taken over by the others.
"""

from __future__ import annotations

import asyncio
import csv
import gzip
import json
import os
import signal
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

import asyncpg
import redis.asyncio as aioredis

from gridstream.common import codec, db
from gridstream.common import streams as S
from gridstream.common.bus import Producer
from gridstream.common.messages import Candle, Signal, deterministic_id

REPO = Path(__file__).resolve().parents[2]
SYMBOLS = ("BNBUSDT", "BTCUSDT", "ETHUSDT", "SOLUSDT", "XRPUSDT")
N_CANDLES = 240
REPLICAS = 3
#: Short indicator windows: the first signal comes at candle 39 instead of 259.
SIGNAL_ENV = {
    "GS_REGIME_WINDOW": "20",
    "GS_VOL_WINDOW": "20",
    "GS_VWAP_WINDOW": "20",
    "GS_HIGHER_INTERVALS": "",
}
WARMUP = 39
LEASE_TTL_MS = 1500


def real_candles(symbol: str, n: int) -> list[Candle]:
    out: list[Candle] = []
    with gzip.open(REPO / "data" / "klines" / f"{symbol}-1m.csv.gz", "rt") as fh:
        for row in csv.DictReader(fh):
            t = int(row["open_time_ms"])
            out.append(
                Candle(
                    id=deterministic_id("candle", symbol, "1m", t),
                    ts_event=(t + 59_999) * 1_000_000,
                    ts_init=(t + 59_999) * 1_000_000,
                    symbol=symbol,
                    interval="1m",
                    open_time=t,
                    close_time=t + 59_999,
                    open=Decimal(row["open"]),
                    high=Decimal(row["high"]),
                    low=Decimal(row["low"]),
                    close=Decimal(row["close"]),
                    volume=Decimal(row["volume"]),
                )
            )
            if len(out) == n:
                break
    return out


async def wait_for(condition, timeout_s: float, procs=(), what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await condition():
            return
        for p in procs:
            if p.poll() is not None and p.returncode not in (-signal.SIGKILL,):
                raise AssertionError(f"a replica exited with {p.returncode}")
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def test_three_signals_replicas_split_five_symbols_and_survive_a_kill(
    redis_url, database_url, tmp_path
):
    candles = {s: real_candles(s, N_CANDLES) for s in SYMBOLS}
    env = {k: v for k, v in os.environ.items() if not k.startswith("GS_")}
    env.update(
        SIGNAL_ENV,
        REDIS_URL=redis_url,
        DATABASE_URL=database_url,
        GS_SYMBOLS=",".join(SYMBOLS),
        GS_LEASE_TTL_MS=str(LEASE_TTL_MS),
        GS_BLOCK_MS="50",
        GS_CLAIM_INTERVAL_S="1",
        GS_METRICS_PORT="0",
        GS_LOG_FORMAT="text",
        PYTHONUNBUFFERED="1",
    )
    r = aioredis.Redis.from_url(redis_url)
    procs: list[subprocess.Popen[bytes]] = []
    logs = []
    try:
        for i in range(REPLICAS):
            log = open(tmp_path / f"signals-{i}.log", "wb")  # noqa: SIM115
            logs.append(log)
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "gridstream.signals"],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=REPO,
                )
            )

        async def owners() -> dict[str, str]:
            out = {}
            for sym in SYMBOLS:
                v = await r.get(S.lease_key(S.Service.SIGNALS, sym))
                if v:
                    out[sym] = v.decode().split("@", 1)[0]
            return out

        async def balanced() -> bool:
            o = await owners()
            members = await r.zrange(S.replicas_key(S.Service.SIGNALS), 0, -1)
            counts = sorted(list(o.values()).count(str(i)) for i in range(REPLICAS))
            return len(o) == 5 and len(members) == REPLICAS and counts == [1, 2, 2]

        await wait_for(balanced, 60, procs, "five symbols split 1/2/2 over three replicas")
        # replica ids are unique by construction: 0, 1, 2
        beats = [
            json.loads(v)
            for v in await r.mget([S.heartbeat_key("signals", str(i)) for i in range(REPLICAS)])
            if v
        ]
        pid_of = {b["replica"]: b["pid"] for b in beats}
        assert sorted(pid_of) == ["0", "1", "2"]

        producer = Producer(r)
        conn = await asyncpg.connect(database_url)

        async def publish(start: int) -> None:
            """As the ingestor does: into Postgres (warm-up reads it), then the stream."""
            chunk = [c for s in SYMBOLS for c in candles[s][start : start + 20]]
            async with conn.transaction():
                await db.copy_upsert(
                    conn,
                    db.CANDLES_TABLE,
                    db.CANDLE_COLUMNS,
                    [db.candle_record(c) for c in chunk],
                    key=db.CANDLE_KEY,
                )
            await producer.publish([(S.stream(S.Kind.CANDLES, c.symbol), c) for c in chunk])

        half = N_CANDLES // 2
        for start in range(0, half, 20):
            await publish(start)
        # kill the replica holding two symbols, while it has the first half in hand
        o = await owners()
        victim = next(rep for rep in sorted(set(o.values())) if list(o.values()).count(rep) == 2)
        victim_syms = [s for s, rep in o.items() if rep == victim]

        async def victim_busy() -> bool:
            n = 0
            for s in victim_syms:
                n += await r.xlen(S.stream(S.Kind.SIGNALS, s))
            return n > 0

        await wait_for(victim_busy, 60, procs, "the victim handling its symbols")
        os.kill(pid_of[victim], signal.SIGKILL)
        victim_proc = next(p for p in procs if p.pid == pid_of[victim])
        victim_proc.wait(10)
        killed_at = time.monotonic()
        for start in range(half, N_CANDLES, 20):
            await publish(start)
        await conn.close()
        survivors = [p for p in procs if p is not victim_proc]

        async def taken_over() -> bool:
            o = await owners()
            return len(o) == 5 and victim not in o.values()

        await wait_for(taken_over, 60, survivors, "the survivors taking the victim's symbols")
        took_s = time.monotonic() - killed_at

        async def all_signals() -> bool:
            for s in SYMBOLS:
                if await r.xlen(S.stream(S.Kind.SIGNALS, s)) < N_CANDLES - WARMUP + 1:
                    return False
            return True

        await wait_for(all_signals, 90, survivors, "a signal for every candle")
        for s in SYMBOLS:
            sigs = [
                codec.decode(f[codec.FIELD]) for _, f in await r.xrange(S.stream(S.Kind.SIGNALS, s))
            ]
            assert all(isinstance(x, Signal) and x.interval == "1m" for x in sigs)
            times = [x.open_time for x in sigs]
            expected = [c.open_time for c in candles[s][WARMUP - 1 :]]
            assert times == expected, f"{s}: one signal per candle, in order"
        assert took_s < LEASE_TTL_MS / 1000 * 10
        assert await r.xlen(S.dead_letters(S.Service.SIGNALS)) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
        for log in logs:
            log.close()
        await r.aclose()
