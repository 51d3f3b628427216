"""Messages per second through one consumer-group service, beside redis-benchmark.

The service loop is the real one (gridstream.common.bus.Consumer): XREADGROUP a batch,
decode, run an engine, encode, XADD the outputs (bounded) and XACK the inputs in one
script. The engine is a real per-symbol one: it keeps a running VWAP per symbol and emits
one message per input. The reference is `redis-benchmark` pipelined XADD on the same
server in the same run, so the ratio is what matters across machines.

A second run has one of the five streams blocked: its handler raises ``RetryLater`` for
any call that holds an entry of it, forever (an executor outcome still unknown). The
rate of the other four is printed beside the unblocked rate of the same run.

    uv run python bench/bus_throughput.py [--messages 200000] [--redis-url URL]

Without --redis-url (or REDIS_URL) an embedded valkey-server is started.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path
from urllib.parse import urlsplit

import redis.asyncio as aioredis

from gridstream.common import streams as S
from gridstream.common.bus import Consumer, Delivery, Outgoing, Producer, RetryLater
from gridstream.common.messages import Tick, deterministic_id

SYMBOLS = ["BTCUSDT", "ETHUSDT", "BNBUSDT", "SOLUSDT", "XRPUSDT"]
GROUP = "bench"


class VwapEngine:
    """A small pure engine: running VWAP per symbol, one output tick per input tick."""

    def __init__(self) -> None:
        self.notional: dict[str, Decimal] = {}
        self.volume: dict[str, Decimal] = {}

    def on_tick(self, t: Tick) -> Tick:
        n = self.notional.get(t.symbol, Decimal(0)) + t.price * t.qty
        v = self.volume.get(t.symbol, Decimal(0)) + t.qty
        self.notional[t.symbol] = n
        self.volume[t.symbol] = v
        return Tick(
            id=deterministic_id("vwap", t.id),
            ts_event=t.ts_event,
            ts_init=t.ts_init,
            symbol=t.symbol,
            trade_id=t.trade_id,
            price=(n / v).quantize(Decimal("0.01")),
            qty=t.qty,
            side=t.side,
        )


def redis_benchmark(host: str, port: int, n: int) -> float:
    """Pipelined XADD requests per second as measured by redis-benchmark."""
    exe = shutil.which("redis-benchmark") or shutil.which("valkey-benchmark")
    if exe is None:
        raise SystemExit("redis-benchmark is not installed (apt-get install redis-tools)")
    out = subprocess.run(
        [
            exe,
            "-h",
            host,
            "-p",
            str(port),
            "-n",
            str(n),
            "-P",
            "1000",
            "-c",
            "1",
            "-q",
            "XADD",
            "gs:bench:ref",
            "MAXLEN",
            "~",
            "100000",
            "*",
            "m",
            "x" * 120,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    match = re.findall(r"([\d.]+) requests per second", out)
    if not match:
        raise SystemExit(f"cannot read redis-benchmark output: {out!r}")
    return float(match[-1])


def out_stream(symbol: str) -> str:
    """Where the bench service writes (a stream of no kind: the VWAP ticks)."""
    return f"gs:bench:vwap:{symbol}"


async def service_rate(url: str, n: int, batch: int, blocked: str | None = None) -> float:
    """Messages per second handled; with ``blocked``, of the streams that are not blocked."""
    r = aioredis.Redis.from_url(url)
    await r.flushdb()
    src = [S.stream(S.Kind.TICKS, s) for s in SYMBOLS]
    producer = Producer(r, maxlen=n + 10, create_groups=False)
    t0 = 1_774_267_740_000_000_000
    chunk = 10_000
    for start in range(0, n, chunk):
        await producer.publish(
            (
                src[i % len(SYMBOLS)],
                Tick(
                    id=f"t{i}",
                    ts_event=t0 + i,
                    ts_init=t0 + i,
                    symbol=SYMBOLS[i % len(SYMBOLS)],
                    trade_id=i,
                    price=Decimal("70070.53") + i % 100,
                    qty=Decimal("0.00123"),
                    side="BUY",
                ),
            )
            for i in range(start, min(n, start + chunk))
        )
    engine = VwapEngine()

    blocked_stream = S.stream(S.Kind.TICKS, blocked) if blocked else None

    async def handle(deliveries: Sequence[Delivery]) -> list[Outgoing]:
        if blocked_stream is not None and any(d.stream == blocked_stream for d in deliveries):
            raise RetryLater("outcome unknown")
        out: list[Outgoing] = []
        for d in deliveries:
            msg = d.message
            assert isinstance(msg, Tick)
            res = engine.on_tick(msg)
            out.append((out_stream(res.symbol), res))
        return out

    c = Consumer(
        r,
        group=GROUP,
        consumer="bench-0",
        streams=src,
        handler=handle,
        batch_size=batch,
        block_ms=10,
        claim_interval_s=3600,
        bounds={k: n + 10 for k in S.DEFAULT_BOUNDS},
    )
    await c.ensure_groups()
    flowing = [s for s in SYMBOLS if s != blocked]
    want = sum(1 for i in range(n) if SYMBOLS[i % len(SYMBOLS)] != blocked)
    started = time.perf_counter()
    while c.processed < want:
        await c.run_once()
    elapsed = time.perf_counter() - started
    outs = sum([await r.xlen(out_stream(s)) for s in flowing])
    pending = sum(
        [(await r.xpending(S.stream(S.Kind.TICKS, s), GROUP))["pending"] for s in flowing]
    )
    await r.flushdb()
    await r.aclose()
    if outs != want or pending:
        raise SystemExit(f"bench is wrong: {outs} outputs, {pending} pending for {want} inputs")
    return want / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=200_000)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--redis-url", default=os.environ.get("REDIS_URL"))
    args = ap.parse_args()
    server = None
    url = args.redis_url
    if not url:
        from gridstream.common import embedded

        server = embedded.start_valkey(Path(tempfile.mkdtemp(prefix="gs-bench-")))
        url = server.url
    # Use a database of its own so nothing else on the server is touched.
    parts = urlsplit(url)
    url = f"{parts.scheme}://{parts.netloc}/14"
    try:
        host, port = parts.hostname or "127.0.0.1", parts.port or 6379
        ref = redis_benchmark(host, port, 1_000_000)
        rate = asyncio.run(service_rate(url, args.messages, args.batch))
        blocked = asyncio.run(service_rate(url, args.messages, args.batch, blocked=SYMBOLS[2]))
    finally:
        if server is not None:
            server.stop()
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores, batch {args.batch}")
    print(f"reference  redis-benchmark pipelined XADD (-P 1000): {ref:12,.0f} req/s")
    print(f"gridstream consumer-group service loop:              {rate:12,.0f} msg/s")
    print(
        f"ratio service/reference: {rate / ref:.3f}   target >= 0.115: "
        f"{'MET' if rate / ref >= 0.115 else 'NOT MET'}"
        f"   (absolute, machine-dependent: {rate:,.0f} msg/s vs 50,000 aimed for)"
    )
    print(f"one stream of five blocked forever, the other four:  {blocked:12,.0f} msg/s")
    print(
        f"ratio blocked/unblocked: {blocked / rate:.3f}   target >= 0.80: "
        f"{'MET' if blocked / rate >= 0.8 else 'NOT MET'}"
    )


if __name__ == "__main__":
    main()
