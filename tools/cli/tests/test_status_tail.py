"""status, tail and dlq against a real Redis with real entries (the CLI run as a process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from decimal import Decimal

import redis as sync_redis

from gridstream.common import bus, codec
from gridstream.common.bus import Consumer, Delivery, Outgoing, Producer
from gridstream.common.messages import Candle, OrderIntent, deterministic_id
from gridstream.common.runtime import redis_client
from gridstream.common.streams import Kind, Service, dead_letters, group, heartbeat_key, stream

BTC_CANDLES = stream(Kind.CANDLES, "BTCUSDT")
BTC_INTENTS = stream(Kind.INTENTS, "BTCUSDT")
T0_MS = 1_709_251_200_000


def candle(i: int) -> Candle:
    open_time = T0_MS + i * 60_000
    return Candle(
        id=deterministic_id("candle", "BTCUSDT", "1m", open_time),
        ts_event=(open_time + 60_000) * 1_000_000,
        ts_init=(open_time + 60_000) * 1_000_000,
        symbol="BTCUSDT",
        interval="1m",
        open_time=open_time,
        close_time=open_time + 59_999,
        open=Decimal("64000.10"),
        high=Decimal("64100.00"),
        low=Decimal("63900.01"),
        close=Decimal(f"64050.0000000{i}"),
        volume=Decimal("1.5"),
    )


def intent(n: int) -> OrderIntent:
    return OrderIntent(
        id=f"intent-{n}",
        ts_event=T0_MS * 1_000_000,
        ts_init=T0_MS * 1_000_000,
        action="place",
        symbol="BTCUSDT",
        client_order_id=f"gs-{n}",
        side="BUY",
        price=Decimal("64000.01"),
        qty=Decimal("0.0001"),
    )


def cli(redis_url: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "REDIS_URL": redis_url}
    return subprocess.run(
        [sys.executable, "-m", "gridstream.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


async def seed(redis_url: str) -> None:
    """5 candles read by signals (2 left unacked), 2 intents of which risk dead-letters one."""
    redis = redis_client(redis_url)
    await Producer(redis).publish([(BTC_CANDLES, candle(i)) for i in range(5)])

    async def ack_first_three(batch: Sequence[Delivery]) -> list[Outgoing]:
        return []

    signals = Consumer(
        redis,
        group=group(Service.SIGNALS),
        consumer="signals-0",
        streams=[BTC_CANDLES],
        handler=ack_first_three,
        batch_size=3,
        block_ms=10,
    )
    await signals.ensure_groups()
    await signals.run_once()  # 3 read and acked
    await redis.xreadgroup(group(Service.SIGNALS), "signals-0", {BTC_CANDLES: ">"}, count=1)

    async def refuse_intent_1(batch: Sequence[Delivery]) -> list[Outgoing]:
        for d in batch:
            if d.message.id == "intent-1":
                raise ValueError("price outside the grid")
        return []

    await Producer(redis).publish([(BTC_INTENTS, intent(0)), (BTC_INTENTS, intent(1))])
    risk = Consumer(
        redis,
        group=group(Service.RISK),
        consumer="risk-0",
        streams=[BTC_INTENTS],
        handler=refuse_intent_1,
        max_deliveries=1,
        block_ms=10,
        retry_backoff_s=0,
    )
    await risk.ensure_groups()
    deadline = time.monotonic() + 60
    while not await redis.xlen(dead_letters(group(Service.RISK))):
        assert time.monotonic() < deadline, "risk never dead-lettered intent-1"
        await risk.run_once()
    await redis.set(
        heartbeat_key(Service.RISK.value, "0"),
        json.dumps(
            {
                "service": "risk",
                "replica": "0",
                "pid": 4242,
                "ready": True,
                "metrics_port": 9104,
                "ts": time.time_ns(),
            }
        ),
    )
    await redis.set(
        heartbeat_key(Service.SIGNALS.value, "0"),
        json.dumps(
            {
                "service": "signals",
                "replica": "0",
                "pid": 4243,
                "ready": True,
                "metrics_port": 9102,
                "ts": time.time_ns() - 60 * 10**9,
            }
        ),
    )
    await redis.aclose()


async def test_status_shows_streams_groups_dead_letters_and_health(redis_url):
    await seed(redis_url)
    r = sync_redis.Redis.from_url(redis_url)
    r.set("gs:state:not-a-stream", "x")  # other key types are not listed
    out = cli(redis_url, "status", "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    by_name = {s["name"]: s for s in report["streams"]}
    assert set(by_name) == {BTC_CANDLES, BTC_INTENTS}
    assert by_name[BTC_CANDLES]["length"] == 5
    candle_groups = {g["name"]: g for g in by_name[BTC_CANDLES]["groups"]}
    # the producer made every durable group of the stream, read or not
    assert set(candle_groups) == {"signals", "archiver"}
    sig = candle_groups["signals"]
    assert (sig["pending"], sig["lag"]) == (1, 1)
    assert [c["name"] for c in sig["consumers"]] == ["signals-0"]
    assert (candle_groups["archiver"]["pending"], candle_groups["archiver"]["lag"]) == (0, 5)
    intent_groups = {g["name"]: g for g in by_name[BTC_INTENTS]["groups"]}
    risk = intent_groups["risk"]
    assert (risk["pending"], risk["lag"]) == (0, 0)
    assert report["dead_letters"] == [
        {"name": dead_letters(group(Service.RISK)), "group": "risk", "length": 1}
    ]
    health = {s["service"]: s for s in report["services"]}
    assert health["risk"]["ready"] is True
    assert health["risk"]["stale"] is False
    assert health["risk"]["metrics_port"] == 9104
    assert health["signals"]["stale"] is True

    human = cli(redis_url, "status")
    assert human.returncode == 0, human.stderr
    lines = [x.split() for x in human.stdout.splitlines() if x.startswith(BTC_CANDLES)]
    assert [BTC_CANDLES, "5", "signals", "1", "1", "signals-0"] in lines
    assert "STALE" in human.stdout
    assert dead_letters("risk") in human.stdout


async def test_tail_decodes_entries_and_dead_letters(redis_url):
    await seed(redis_url)
    r = sync_redis.Redis.from_url(redis_url)
    r.xadd(BTC_CANDLES, {codec.FIELD: b"\xc1 not msgpack"})
    out = cli(redis_url, "tail", BTC_CANDLES, "--last", "3")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(x) for x in out.stdout.splitlines()]
    assert len(rows) == 3
    assert [row["message"]["close"] for row in rows[:2]] == ["64050.00000003", "64050.00000004"]
    assert rows[0]["message"]["kind"] == "candle"
    assert rows[2]["message"] is None
    assert rows[2]["error"].startswith("decode:")
    ids = [e[0].decode() for e in r.xrange(BTC_CANDLES)]
    assert [row["entry_id"] for row in rows] == ids[-3:]

    frm = cli(redis_url, "tail", BTC_CANDLES, "--from", ids[1])
    assert [json.loads(x)["entry_id"] for x in frm.stdout.splitlines()] == ids[1:]

    dlq = cli(redis_url, "tail", dead_letters("risk"))
    (row,) = [json.loads(x) for x in dlq.stdout.splitlines()]
    assert row["dead_letter"]["stream"] == BTC_INTENTS
    assert row["dead_letter"]["by_reference"] is False
    assert row["dead_letter"]["size"] == len(codec.encode(intent(1)))
    assert "price outside the grid" in row["dead_letter"]["reason"]
    assert row["message"]["id"] == "intent-1"

    listed = cli(redis_url, "dlq", "list", "risk")
    assert [json.loads(x)["message"]["id"] for x in listed.stdout.splitlines()] == ["intent-1"]


async def test_tail_follow_prints_new_entries(redis_url):
    env = {**os.environ, "REDIS_URL": redis_url}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gridstream.cli", "tail", BTC_CANDLES, "--last", "0", "--follow"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        r = sync_redis.Redis.from_url(redis_url)
        assert proc.stderr is not None
        # the entry is added only once tail says where it follows from (a blocking read
        # of stderr, bounded by the test timeout): it cannot start after the entry
        said = proc.stderr.readline()
        while said and not said.startswith("following new entries after"):
            said = proc.stderr.readline()
        assert said, "tail --follow exited before following"
        r.xadd(BTC_CANDLES, {codec.FIELD: codec.encode(candle(7))})
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert json.loads(line)["message"]["open_time"] == T0_MS + 7 * 60_000
    finally:
        proc.kill()
        proc.wait()


async def test_dlq_replay_moves_entries_back(redis_url):
    await seed(redis_url)
    r = sync_redis.Redis.from_url(redis_url)
    assert r.xlen(BTC_INTENTS) == 2
    out = cli(redis_url, "dlq", "replay", "risk")
    assert out.returncode == 0, out.stderr
    assert "replayed 1" in out.stdout
    assert r.xlen(dead_letters("risk")) == 0
    entries = r.xrange(BTC_INTENTS)
    assert len(entries) == 3
    assert codec.decode(entries[-1][1][codec.FIELD]) == intent(1)
    # the replayed entry is new to the group: lag 1
    infos = {i["name"].decode(): i for i in r.xinfo_groups(BTC_INTENTS)}
    assert infos["risk"]["lag"] == 1
    # and meant for risk only
    assert entries[-1][1][bus.TARGET_GROUP] == b"risk"
