"""Failover of a killed replica: from SIGKILL to the first entry handled by the new owner.

Three real signals replicas (``python -m gridstream.signals``) share one symbol through
its lease; real BTCUSDT 1m candles flow in (Postgres first, then the stream, as the
ingestor writes them) every ``--interval-ms``. Each round SIGKILLs the replica holding
the symbol and measures the time until a signal for a candle newer than any signal
before the kill appears (the dead replica cannot write any more, so it is the new
owner's), then starts a replacement so three replicas run again.

Reference, same run: a clean handover (SIGTERM to the holder, which releases its lease at
once) measured the same way, and the lease TTL itself (the floor of a SIGKILL failover:
the dead holder's lease must expire).

    uv run python bench/failover.py [--kills 20] [--lease-ttl-ms 6000]

Needs REDIS_URL and DATABASE_URL (a database it may create tables in), else embedded
servers are started.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import gzip
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from decimal import Decimal
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import redis.asyncio as aioredis

from gridstream.common import codec, db, embedded
from gridstream.common import streams as S
from gridstream.common.bus import Producer
from gridstream.common.messages import Candle, deterministic_id

REPO = Path(__file__).resolve().parents[1]
SYMBOL = "BTCUSDT"
SIGNALS = S.stream(S.Kind.SIGNALS, SYMBOL)
CANDLES = S.stream(S.Kind.CANDLES, SYMBOL)
#: Short indicator windows, so a new owner's warm-up is a few dozen rows.
ENV = {
    "GS_REGIME_WINDOW": "20",
    "GS_VOL_WINDOW": "20",
    "GS_VWAP_WINDOW": "20",
    "GS_HIGHER_INTERVALS": "",
}


def candles(n: int) -> list[Candle]:
    """``n`` real 1m candles, the file tiled forward in time when it is too short."""
    rows = []
    with gzip.open(REPO / "data" / "klines" / f"{SYMBOL}-1m.csv.gz", "rt") as fh:
        rows = list(csv.DictReader(fh))
    out = []
    first = int(rows[0]["open_time_ms"])
    span = int(rows[-1]["open_time_ms"]) - first + 60_000
    for i in range(n):
        row = rows[i % len(rows)]
        t = int(row["open_time_ms"]) + (i // len(rows)) * span
        out.append(
            Candle(
                id=deterministic_id("candle", SYMBOL, "1m", t),
                ts_event=(t + 59_999) * 1_000_000,
                ts_init=(t + 59_999) * 1_000_000,
                symbol=SYMBOL,
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
    return out


class Bench:
    def __init__(self, redis_url: str, database_url: str, ttl_ms: int, interval_ms: int) -> None:
        self.redis_url = redis_url
        self.database_url = database_url
        self.ttl_ms = ttl_ms
        self.interval_s = interval_ms / 1000
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("GS_")}
        self.env.update(
            ENV,
            REDIS_URL=redis_url,
            DATABASE_URL=database_url,
            GS_SYMBOLS=SYMBOL,
            GS_LEASE_TTL_MS=str(ttl_ms),
            GS_BLOCK_MS="20",
            GS_METRICS_PORT="0",
            GS_LOG_FORMAT="text",
        )
        self.procs: list[subprocess.Popen[bytes]] = []
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the bench

    def spawn(self) -> None:
        self.procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "gridstream.signals"],
                env=self.env,
                stdout=self.log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
            )
        )

    async def holder_pid(self, r: aioredis.Redis) -> int | None:
        value = await r.get(S.lease_key(S.Service.SIGNALS, SYMBOL))
        if not value:
            return None
        # the lease value is "<replica>@<host>:<pid>:<start ns>"
        return int(value.decode().rsplit(":", 2)[1])

    async def newest_signal_time(self, r: aioredis.Redis) -> int:
        last = await r.xrevrange(SIGNALS, count=1)
        return codec.decode(last[0][1][codec.FIELD]).open_time if last else 0  # type: ignore[union-attr]

    async def run(self, kills: int) -> tuple[list[float], list[float]]:
        r = aioredis.Redis.from_url(self.redis_url)
        await r.flushdb()
        conn = await asyncpg.connect(self.database_url)
        await db.migrate(conn)
        await conn.execute("TRUNCATE candles")
        feed = candles(int((kills * 2 * (self.ttl_ms / 1000 + 8) + 120) / self.interval_s))
        producer = Producer(r)
        stop = asyncio.Event()

        async def publish() -> None:
            for c in feed:
                if stop.is_set():
                    return
                async with conn.transaction():
                    await db.copy_upsert(
                        conn,
                        db.CANDLES_TABLE,
                        db.CANDLE_COLUMNS,
                        [db.candle_record(c)],
                        key=db.CANDLE_KEY,
                    )
                await producer.publish([(CANDLES, c)])
                await asyncio.sleep(self.interval_s)
            raise SystemExit("the candle feed ran out: raise --interval-ms")

        for _ in range(3):
            self.spawn()
        feeder = asyncio.create_task(publish())
        try:
            await self.wait(lambda: self.flowing(r), 120, "the first signals")
            killed = [await self.round(r, signal.SIGKILL) for _ in range(kills)]
            handed = [await self.round(r, signal.SIGTERM) for _ in range(max(5, kills // 4))]
        finally:
            stop.set()
            feeder.cancel()
            with contextlib.suppress(asyncio.CancelledError, BaseException):
                await feeder
            for p in self.procs:
                if p.poll() is None:
                    p.terminate()
            for p in self.procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(20)
            await conn.close()
            await r.flushdb()
            await r.aclose()
        return killed, handed

    async def flowing(self, r: aioredis.Redis) -> bool:
        return await r.xlen(SIGNALS) > 0 and await self.holder_pid(r) is not None

    async def wait(self, cond, timeout_s: float, what: str) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if await cond():
                return
            await asyncio.sleep(0.005)
        raise SystemExit(f"timed out waiting for {what}")

    async def round(self, r: aioredis.Redis, sig: int) -> float:
        await self.wait(lambda: self.flowing(r), 60, "a holder")
        pid = await self.holder_pid(r)
        assert pid is not None
        proc = next(p for p in self.procs if p.pid == pid)
        os.kill(pid, sig)
        t0 = time.monotonic()
        await asyncio.to_thread(proc.wait, 30)
        before = await self.newest_signal_time(r)

        async def new_owner_signalled() -> bool:
            return await self.newest_signal_time(r) > before and await self.holder_pid(r) not in (
                None,
                pid,
            )

        await self.wait(new_owner_signalled, 60, "the new owner's first signal")
        took = time.monotonic() - t0
        self.procs.remove(proc)
        self.spawn()
        return took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--lease-ttl-ms", type=int, default=6000)
    ap.add_argument("--interval-ms", type=int, default=20)
    args = ap.parse_args()
    servers = []
    redis_url = os.environ.get("REDIS_URL")
    database_url = os.environ.get("DATABASE_URL")
    tmp = Path(tempfile.mkdtemp(prefix="gs-failover-"))
    if not redis_url:
        servers.append(embedded.start_valkey(tmp / "valkey"))
        redis_url = servers[-1].url
    if not database_url:
        servers.append(embedded.start_postgres(tmp / "pg"))
        database_url = servers[-1].url
    parts = urlsplit(redis_url)
    redis_url = urlunsplit((parts.scheme, parts.netloc, "/13", "", ""))
    database_url = asyncio.run(_bench_database(database_url))
    try:
        bench = Bench(redis_url, database_url, args.lease_ttl_ms, args.interval_ms)
        killed, handed = asyncio.run(bench.run(args.kills))
    finally:
        for s in servers:
            s.stop()
    ttl = args.lease_ttl_ms / 1000
    p50 = statistics.median(killed)
    print(
        f"python {sys.version.split()[0]}, {os.cpu_count()} cores; lease TTL {ttl:.1f} s, candle every {args.interval_ms} ms"
    )
    print(
        f"reference  clean handover (SIGTERM), {len(handed)} rounds: p50 {statistics.median(handed):6.2f} s  max {max(handed):6.2f} s"
    )
    print(
        f"gridstream failover after SIGKILL, {len(killed)} kills:   p50 {p50:6.2f} s  max {max(killed):6.2f} s"
    )
    print(
        f"ratio failover p50 / lease TTL: {p50 / ttl:.2f}   (the holder's lease must expire: >= ~0.75)"
    )


async def _bench_database(url: str) -> str:
    """A database of the bench's own on the server (created if missing)."""
    parts = urlsplit(url)
    admin = urlunsplit((parts.scheme, parts.netloc, "/postgres", parts.query, ""))
    conn = await asyncpg.connect(admin)
    try:
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = 'gridstream_bench'"):
            await conn.execute("CREATE DATABASE gridstream_bench")
    finally:
        await conn.close()
    return urlunsplit((parts.scheme, parts.netloc, "/gridstream_bench", parts.query, ""))


if __name__ == "__main__":
    main()
