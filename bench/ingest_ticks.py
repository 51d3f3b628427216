"""Ticks per second from ingestor decode to Redis, beside redis-benchmark and redis-py.

The path measured is the ingestor's real one: raw combined-stream JSON frames of real
Binance trades (../shared/data/trades/BTCUSDT-trades-2021-01-08.csv, 2,001 real trades,
repeated with shifted ids/times) -> ``Ingestor.handle_frames`` (parse -> engine dedupe and
trade->candle builder -> ``Tick`` -> msgpack encode -> the bus ``Producer.publish`` commit
script, bounded XADD) -> Redis. References measured in the same run on the same server:
``redis-benchmark`` pipelined XADD (-P 1000) and a plain redis-py pipeline of 1000 XADDs of
the same encoded ticks.

    uv run python bench/ingest_ticks.py [--ticks 200000] [--batch 1000] [--redis-url URL]
        [--profile]

Without --redis-url (or REDIS_URL) an embedded valkey-server is started.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import csv
import json
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from bus_throughput import redis_benchmark

from gridstream.common import codec
from gridstream.common.runtime import Runtime
from gridstream.common.streams import Kind, Service, stream
from gridstream.ingestor.main import Ingestor, IngestorSettings

TRADES = Path("/work/shared/data/trades/BTCUSDT-trades-2021-01-08.csv")
SYMBOL = "BTCUSDT"


def real_frames(n: int) -> list[bytes]:
    """``n`` combined-stream trade frames built from the real trades, ids/times shifted per lap."""
    with TRADES.open() as fh:
        trades = list(csv.DictReader(fh))
    span_ms = int(trades[-1]["time_ms"]) - int(trades[0]["time_ms"]) + 1
    out: list[bytes] = []
    lap = 0
    while len(out) < n:
        for t in trades:
            tid = int(t["id"]) + lap * len(trades)
            ts = int(t["time_ms"]) + lap * span_ms
            data = {
                "e": "trade",
                "E": ts + 1,
                "s": SYMBOL,
                "t": tid,
                "p": f"{t['price']}",
                "q": f"{t['qty']}",
                "T": ts,
                "m": t["is_buyer_maker"] == "true",
                "M": True,
            }
            out.append(
                json.dumps(
                    {"stream": f"{SYMBOL.lower()}@trade", "data": data}, separators=(",", ":")
                ).encode()
            )
            if len(out) == n:
                break
        lap += 1
    return out


async def ingestor_rate(url: str, frames: list[bytes], batch: int, profile: bool) -> float:
    settings = IngestorSettings(
        redis_url=url,
        symbols=[SYMBOL],
        metrics_port=0,
        log_format="text",
        stream_maxlen_ticks=len(frames) + 10,
    )
    rt = Runtime(Service.INGESTOR, settings)
    await rt.start(database=False)
    await rt.redis.flushdb()
    ing = Ingestor(rt, settings)
    prof = cProfile.Profile() if profile else None
    try:
        t0 = time.perf_counter()
        if prof:
            prof.enable()
        for i in range(0, len(frames), batch):
            await ing.handle_frames(frames[i : i + batch])
        await ing.flush()
        if prof:
            prof.disable()
        elapsed = time.perf_counter() - t0
        n = await rt.redis.xlen(stream(Kind.TICKS, SYMBOL))
        last = await rt.redis.xrevrange(stream(Kind.TICKS, SYMBOL), count=1)
        tick = codec.decode(last[0][1][codec.FIELD])
    finally:
        await rt.redis.flushdb()
        await rt.close()
    if n != len(frames) or getattr(tick, "trade_id", None) is None:
        raise SystemExit(f"bench is wrong: {n} ticks in the stream")
    if prof:
        pstats.Stats(prof).sort_stats("tottime").print_stats(15)
    return len(frames) / elapsed


async def redis_py_rate(url: str, frames: list[bytes]) -> float:
    """A plain redis-py pipeline of 1000 XADDs of the same encoded ticks (no parsing)."""
    from gridstream.common.binance.market import parse_frame

    payloads = [codec.encode(parse_frame(f).message) for f in frames]  # type: ignore[arg-type]
    r = aioredis.Redis.from_url(url)
    key = "gs:bench:redispy"
    t0 = time.perf_counter()
    for i in range(0, len(payloads), 1000):
        pipe = r.pipeline(transaction=False)
        for p in payloads[i : i + 1000]:
            pipe.xadd(key, {b"m": p}, maxlen=len(payloads) + 10, approximate=True)
        await pipe.execute()
    elapsed = time.perf_counter() - t0
    await r.delete(key)
    await r.aclose()
    return len(payloads) / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ticks", type=int, default=200_000)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--redis-url", default=os.environ.get("REDIS_URL"))
    ap.add_argument("--profile", action="store_true", help="cProfile the ingestor path")
    args = ap.parse_args()
    server = None
    url = args.redis_url
    if not url:
        from gridstream.common import embedded

        server = embedded.start_valkey(Path(tempfile.mkdtemp(prefix="gs-bench-")))
        url = server.url
    parts = urlsplit(url)
    url = f"{parts.scheme}://{parts.netloc}/13"
    frames = real_frames(args.ticks)
    try:
        host, port = parts.hostname or "127.0.0.1", parts.port or 6379
        ref = redis_benchmark(host, port, 1_000_000)
        rate = asyncio.run(ingestor_rate(url, frames, args.batch, args.profile))
        py = asyncio.run(redis_py_rate(url, frames))
    finally:
        if server is not None:
            server.stop()
    print(
        f"python {sys.version.split()[0]}, {os.cpu_count()} cores, {args.ticks} ticks, batch {args.batch}"
    )
    print(f"reference  redis-benchmark pipelined XADD (-P 1000): {ref:12,.0f} req/s")
    print(f"reference  redis-py pipeline of 1000 XADD:            {py:12,.0f} ticks/s")
    print(f"gridstream ingestor frames -> Tick -> Redis:          {rate:12,.0f} ticks/s")
    print(
        f"ratio ingestor/redis-benchmark: {rate / ref:.3f}   ingestor/redis-py: {rate / py:.2f}"
        f"   target >= 100,000 ticks/s: {'MET' if rate >= 100_000 else 'NOT MET'}"
    )


if __name__ == "__main__":
    main()
