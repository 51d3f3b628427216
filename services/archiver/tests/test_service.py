"""The archiver against real Redis and a real folder."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis as sync_redis
from archiver_factories import DAY_MS, T0_MS, accepted, candle, fill

from gridstream.archiver import parquet
from gridstream.archiver.service import Archiver, archived_streams
from gridstream.archiver.state import archived_up_to
from gridstream.archiver.store import LocalStore, Store
from gridstream.common import codec
from gridstream.common.bus import DLQ_REASON, Producer
from gridstream.common.messages import AnyMessage, Candle, OrderFilled
from gridstream.common.runtime import redis_client
from gridstream.common.streams import Kind, Service, dead_letters, group, stream

GROUP = group(Service.ARCHIVER)
SYMBOLS = ["BTCUSDT", "ETHUSDT"]


def make_archiver(redis, store: Store, **kw) -> Archiver:  # type: ignore[no-untyped-def]
    options = {"flush_rows": 1000, "flush_interval_s": 3600.0, "block_ms": 50}
    options.update(kw)
    return Archiver(
        redis,
        store,
        group=GROUP,
        consumer="archiver-0",
        streams=archived_streams(SYMBOLS),
        **options,  # type: ignore[arg-type]
    )


async def publish(redis, items: list[tuple[str, AnyMessage]]) -> None:  # type: ignore[no-untyped-def]
    await Producer(redis).publish(items)


async def drain(a: Archiver) -> None:
    """Poll until the pending history is read and no new entries arrive."""
    await a.ensure_groups()
    while a.consumer.reading_history:
        await a.poll_once()
    for _ in range(50):
        if await a.poll_once() == 0:
            return


def pending(r: sync_redis.Redis, s: str) -> int:
    return int(r.xpending(s, GROUP)["pending"])


def candle_files(store: LocalStore, symbol: str) -> list[str]:
    return [k for k in store.list(f"candles/symbol={symbol}/") if k.endswith(".parquet")]


async def test_candles_become_parquet_files_with_exactly_those_candles(redis_url, tmp_path):
    redis = redis_client(redis_url)
    store = LocalStore(tmp_path / "archive")
    a = make_archiver(redis, store)
    await a.ensure_groups()
    day1 = [candle("BTCUSDT", i) for i in range(5)]
    day2 = [candle("BTCUSDT", i, start_ms=T0_MS + DAY_MS) for i in range(3)]
    eth = [candle("ETHUSDT", i) for i in range(4)]
    btc = stream(Kind.CANDLES, "BTCUSDT")
    eth_s = stream(Kind.CANDLES, "ETHUSDT")
    await publish(redis, [(btc, c) for c in day1 + day2] + [(eth_s, c) for c in eth])
    await drain(a)
    assert store.list() == []  # nothing due yet: interval 1h, 1000 rows
    assert await a.flush_all() == 3

    keys = candle_files(store, "BTCUSDT")
    assert [k.split("/")[2] for k in keys] == ["date=2024-03-01", "date=2024-03-02"]
    got1 = parquet.read_messages([store.get(keys[0])], Candle)
    got2 = parquet.read_messages([store.get(keys[1])], Candle)
    assert got1 == day1
    assert got2 == day2
    eth_keys = candle_files(store, "ETHUSDT")
    assert parquet.read_messages([store.get(k) for k in eth_keys], Candle) == eth
    # file names are the entries' ids; the sidecar is a valid sha256sum line
    r = sync_redis.Redis.from_url(redis_url)
    ids = [e[0].decode() for e in r.xrange(btc)]
    assert keys[0].endswith(f"part-{ids[0]}-{ids[4]}.parquet")
    out = subprocess.run(
        ["sha256sum", "-c", Path(keys[0]).name + ".sha256"],
        cwd=tmp_path / "archive" / Path(keys[0]).parent,
        capture_output=True,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    # everything acknowledged, watermarks recorded, nothing trimmed
    assert pending(r, btc) == 0
    assert pending(r, eth_s) == 0
    assert r.xlen(btc) == 8
    assert (await archived_up_to(redis)) == {btc: ids[-1], eth_s: r.xrange(eth_s)[-1][0].decode()}
    await redis.aclose()


class CheckingStore(LocalStore):
    """A real local store that asserts, at every write, that the entries are still pending."""

    def __init__(self, root: Path, redis_url: str, stream_name: str, expect: int) -> None:
        super().__init__(root)
        self.r = sync_redis.Redis.from_url(redis_url)
        self.stream_name = stream_name
        self.expect = expect
        self.seen_pending: list[int] = []

    def put(self, key: str, data: bytes) -> None:
        self.seen_pending.append(pending(self.r, self.stream_name))
        super().put(key, data)


async def test_nothing_is_acked_before_the_file_exists(redis_url, tmp_path):
    redis = redis_client(redis_url)
    btc = stream(Kind.CANDLES, "BTCUSDT")
    # 1) a store that cannot write (its root is a file): nothing acked, nothing written
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    broken = make_archiver(redis, LocalStore(blocker), flush_rows=4)
    await broken.ensure_groups()
    await publish(redis, [(btc, candle("BTCUSDT", i)) for i in range(4)])
    with pytest.raises(NotADirectoryError):
        await broken.poll_once()  # own history empty: reads the 4 candles, the flush fails
    r = sync_redis.Redis.from_url(redis_url)
    assert pending(r, btc) == 4
    # 2) restart with a working store: own pending re-read, written, acked only after
    store = CheckingStore(tmp_path / "archive", redis_url, btc, 4)
    a = make_archiver(redis, store, flush_rows=4)
    await drain(a)
    assert store.seen_pending == [4, 4]  # parquet put, sidecar put: both before the ack
    assert pending(r, btc) == 0
    assert parquet.read_messages(
        [store.get(k) for k in candle_files(store, "BTCUSDT")], Candle
    ) == [candle("BTCUSDT", i) for i in range(4)]
    await redis.aclose()


async def test_redelivery_rewrites_the_same_file_not_a_duplicate(redis_url, tmp_path):
    redis = redis_client(redis_url)
    store = LocalStore(tmp_path / "archive")
    btc = stream(Kind.CANDLES, "BTCUSDT")
    candles = [candle("BTCUSDT", i) for i in range(6)]
    first = make_archiver(redis, store)
    await first.ensure_groups()
    await publish(redis, [(btc, c) for c in candles])
    await drain(first)
    # crash before flushing: a new replica with the same name re-reads its pending entries
    second = make_archiver(redis, store)
    await drain(second)
    await second.flush_all()
    files = store.list()
    assert len(files) == 2  # one parquet + its sidecar
    before = store.get(files[0])
    # the whole stream delivered again (e.g. group reset after a lost ack)
    r = sync_redis.Redis.from_url(redis_url)
    r.xgroup_setid(btc, GROUP, "0")
    third = make_archiver(redis, store)
    await drain(third)
    await third.flush_all()
    assert store.list() == files
    assert store.get(files[0]) == before
    assert parquet.read_messages([store.get(files[0])], Candle) == candles
    await redis.aclose()


async def test_fills_archived_other_executions_acked_bad_entries_dead_lettered(redis_url, tmp_path):
    redis = redis_client(redis_url)
    store = LocalStore(tmp_path / "archive")
    ex = stream(Kind.EXECUTIONS, "ETHUSDT")
    a = make_archiver(redis, store)
    await a.ensure_groups()
    await publish(redis, [(ex, accepted("ETHUSDT", 1)), (ex, fill("ETHUSDT", 1))])
    r = sync_redis.Redis.from_url(redis_url)
    r.xadd(ex, {codec.FIELD: b"\xc1garbage"})
    await publish(redis, [(ex, fill("ETHUSDT", 2))])
    await drain(a)
    assert pending(r, ex) == 2  # the two fills wait for their file
    await a.flush_all()
    assert pending(r, ex) == 0
    keys = [k for k in store.list("executions/") if k.endswith(".parquet")]
    assert len(keys) == 1
    assert keys[0].startswith("executions/symbol=ETHUSDT/date=2024-03-01/part-")
    got = parquet.read_messages([store.get(keys[0])], OrderFilled)
    assert got == [fill("ETHUSDT", 1), fill("ETHUSDT", 2)]
    dlq = r.xrange(dead_letters(GROUP))
    assert len(dlq) == 1
    assert dlq[0][1][DLQ_REASON].startswith(b"decode:")
    await redis.aclose()


async def test_flush_interval_writes_without_more_data(redis_url, tmp_path):
    redis = redis_client(redis_url)
    store = LocalStore(tmp_path / "archive")
    a = make_archiver(redis, store, flush_interval_s=0.3)
    await a.ensure_groups()
    await publish(redis, [(stream(Kind.CANDLES, "BTCUSDT"), candle("BTCUSDT", 0))])
    stop = asyncio.Event()
    task = asyncio.create_task(a.run(stop))
    deadline = time.monotonic() + 60
    # the part and then its checksum sidecar: wait for both (a look between the two writes
    # sees one file)
    while len(store.list()) < 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    keys = store.list()
    assert len(keys) == 2 and keys[1] == f"{keys[0]}.sha256", keys
    stop.set()
    await asyncio.wait_for(task, 5)
    await redis.aclose()


def test_service_flushes_on_sigterm(redis_url, tmp_path):
    archive = tmp_path / "archive"
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "GS_SYMBOLS": "BTCUSDT",
        "GS_ARCHIVE_DIR": str(archive),
        "GS_FLUSH_INTERVAL_S": "3600",
        "GS_LOG_FORMAT": "text",
        "GS_BLOCK_MS": "100",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "gridstream.archiver"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    r = sync_redis.Redis.from_url(redis_url)
    btc = stream(Kind.CANDLES, "BTCUSDT")
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if r.exists(btc) and r.xinfo_groups(btc):
                break
            time.sleep(0.05)
        for i in range(3):
            r.xadd(btc, {codec.FIELD: codec.encode(candle("BTCUSDT", i))})
        while time.monotonic() < deadline and r.xpending(btc, GROUP)["pending"] < 3:
            time.sleep(0.05)
        assert r.xpending(btc, GROUP)["pending"] == 3
        assert not archive.exists() or not any(archive.rglob("*.parquet"))
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out.decode()
    files = sorted(archive.rglob("*.parquet"))
    assert len(files) == 1
    assert parquet.read_messages([files[0].read_bytes()], Candle) == [
        candle("BTCUSDT", i) for i in range(3)
    ]
    assert r.xpending(btc, GROUP)["pending"] == 0


async def test_dead_replicas_held_entries_are_taken_over_after_claim_idle(redis_url, tmp_path):
    redis = redis_client(redis_url)
    store = LocalStore(tmp_path / "archive")
    btc = stream(Kind.CANDLES, "BTCUSDT")
    candles = [candle("BTCUSDT", i) for i in range(5)]
    opts = {"claim_idle_ms": 60_000, "claim_interval_s": 0.0}
    dead = make_archiver(redis, store, **opts)
    await dead.ensure_groups()
    await publish(redis, [(btc, c) for c in candles])
    await drain(dead)
    assert dead.consumer.held == 5 and store.list() == []
    # replica 0 dies holding them (never flushed); replica 1 takes them once idle
    survivor = Archiver(
        redis,
        store,
        group=GROUP,
        consumer="archiver-1",
        streams=archived_streams(SYMBOLS),
        flush_rows=1000,
        flush_interval_s=3600.0,
        block_ms=50,
        **opts,  # type: ignore[arg-type]
    )
    await drain(survivor)
    assert survivor.consumer.held == 0  # not idle long enough yet
    # make the dead replica's entries look idle past the limit (XCLAIM IDLE, JUSTID: owner
    # and delivery count unchanged) rather than wait a minute
    rows = await redis.xpending_range(
        btc, GROUP, min="-", max="+", count=100, consumername="archiver-0"
    )
    await redis.xclaim(
        btc, GROUP, "archiver-0", 0, [row["message_id"] for row in rows], idle=120_000, justid=True
    )
    await drain(survivor)
    assert survivor.consumer.held == 5
    await survivor.flush_all()
    r = sync_redis.Redis.from_url(redis_url)
    assert pending(r, btc) == 0
    assert parquet.read_messages(
        [store.get(k) for k in candle_files(store, "BTCUSDT")], Candle
    ) == (candles)
    await redis.aclose()
