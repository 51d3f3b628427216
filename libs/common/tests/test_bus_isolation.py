"""The bus under failures, on a real Redis: a blocked stream blocks only itself, order
holds through retries, reclaims and crashes, delivery counts are exact, reclaim walks the
whole pending list, trimmed entries are recorded as lost, dead letters are complete."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import defaultdict
from collections.abc import Sequence

import msgspec
import pytest
import redis.asyncio as aioredis

from gridstream.common import bus, codec, metrics
from gridstream.common import streams as S
from gridstream.common.bus import Consumer, Delivery, Producer

from .factories import candle, tick

GROUP = "testsvc"
SYMBOLS = ("AAAUSDT", "BBBUSDT", "CCCUSDT", "DDDUSDT", "EEEUSDT")
STREAMS = [S.stream(S.Kind.TICKS, s) for s in SYMBOLS]
BLOCKED = STREAMS[2]


def out_of(stream: str) -> str:
    """Where the echo handler writes what it handled of ``stream`` (a stream of no kind)."""
    return f"gs:test:out:{stream.rsplit(':', 1)[-1]}"


def ticks(n: int, symbol: str, start: int = 0):
    return [tick(trade_id=i, symbol=symbol) for i in range(start, start + n)]


@pytest.fixture
async def r(redis_url):
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


def consumer(r, streams=STREAMS, name="c1", handler=None, **kw) -> Consumer:
    opts = dict(
        batch_size=50,
        block_ms=20,
        max_deliveries=3,
        claim_idle_ms=60_000,
        claim_interval_s=3600,
        retry_backoff_s=0.01,
    )
    opts.update(kw)
    return Consumer(r, group=GROUP, consumer=name, streams=streams, handler=handler, **opts)


async def outputs(r, stream: str) -> list[str]:
    return [codec.decode(f[codec.FIELD]).id for _, f in await r.xrange(out_of(stream))]


async def until(condition, timeout_s: float = 60.0, step=None) -> None:
    """Run ``step`` (a consumer pass) until ``condition`` holds, or fail at the deadline."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await condition():
            return
        if step is not None:
            await step()
        else:
            await asyncio.sleep(0.01)
    raise AssertionError("condition not met before the deadline")


async def age(r, stream: str, consumer_name: str, idle_ms: int = 600_000) -> int:
    """Make a consumer's pending entries look idle (XCLAIM IDLE JUSTID: no delivery)."""
    rows = await r.xpending_range(
        stream, GROUP, min="-", max="+", count=10_000, consumername=consumer_name
    )
    ids = [row["message_id"] for row in rows]
    if ids:
        await r.xclaim(stream, GROUP, consumer_name, 0, ids, idle=idle_ms, justid=True)
    return len(ids)


class Blocking:
    """Echo handler that refuses (RetryLater) any call holding an entry of ``blocked``;
    records what each successful call handled, per stream, and every sighting."""

    def __init__(self, blocked: str | None = BLOCKED) -> None:
        self.blocked = blocked
        self.handled: dict[str, list[str]] = defaultdict(list)
        self.sightings: dict[tuple[str, bytes], int] = defaultdict(int)
        self.count_mismatches: list[tuple[str, bytes, int, int]] = []

    async def __call__(self, batch: Sequence[Delivery]):
        for d in batch:
            key = (d.stream, d.entry_id)
            self.sightings[key] += 1
            if d.deliveries != self.sightings[key]:
                self.count_mismatches.append((*key, d.deliveries, self.sightings[key]))
        if any(d.stream == self.blocked for d in batch):
            raise bus.RetryLater("outcome unknown: ask the venue again later")
        for d in batch:
            self.handled[d.stream].append(d.message.id)
        return [(out_of(d.stream), d.message) for d in batch]


async def test_one_blocked_stream_of_five_blocks_only_itself(r):
    msgs = {s: ticks(300, sym) for s, sym in zip(STREAMS, SYMBOLS, strict=True)}
    await Producer(r).publish([(s, m) for s in STREAMS for m in msgs[s]])
    h = Blocking()
    c = consumer(r, handler=h, batch_size=64)
    await c.ensure_groups()
    others = [s for s in STREAMS if s != BLOCKED]

    async def others_done() -> bool:
        return all(len(h.handled[s]) >= 300 for s in others)

    await until(others_done, step=c.run_once)
    for s in others:  # everything, once, in order
        assert h.handled[s] == [m.id for m in msgs[s]]
        assert await outputs(r, s) == [m.id for m in msgs[s]]
    # the blocked stream handed out nothing, dead-lettered nothing, and waits
    assert h.handled[BLOCKED] == []
    assert await r.xlen(S.dead_letters(GROUP)) == 0
    assert c.blocked() == [BLOCKED]
    # new entries on the other streams keep flowing while it waits
    more = {s: ticks(50, s.rsplit(":", 1)[-1], start=300) for s in others}
    await Producer(r).publish([(s, m) for s in others for m in more[s]])

    async def more_done() -> bool:
        return all(len(h.handled[s]) >= 350 for s in others)

    await until(more_done, step=c.run_once)
    for s in others:
        assert h.handled[s] == [m.id for m in msgs[s] + more[s]]
    assert h.count_mismatches == []
    # only the blocked stream's head was retried alone; the rest of it was read once
    rows = await r.xpending_range(BLOCKED, GROUP, min="-", max="+", count=1000)
    head = rows[0]
    assert int(head["times_delivered"]) == h.sightings[(BLOCKED, head["message_id"])] >= 3
    assert max(int(x["times_delivered"]) for x in rows[1:]) <= 2
    # once the cause is gone, the blocked stream delivers everything, in order
    h.blocked = None
    await until(lambda: _eq(h.handled, BLOCKED, 300), step=c.run_once)
    assert h.handled[BLOCKED] == [m.id for m in msgs[BLOCKED]]
    assert c.blocked() == []
    assert h.count_mismatches == []


async def _false() -> bool:
    return False


async def _eq(handled, stream, n) -> bool:
    return len(handled[stream]) >= n


_VICTIM = """
import asyncio, sys, redis.asyncio as aioredis
from gridstream.common.bus import Consumer, RetryLater
STREAMS = {streams!r}
BLOCKED = {blocked!r}
calls = 0
async def handler(batch):
    global calls
    if any(d.stream == BLOCKED for d in batch):
        raise RetryLater("blocked")
    calls += 1
    if calls == {die_at}:
        print("holding", flush=True)
        await asyncio.sleep(3600)  # SIGKILLed here, holding this call's entries
    return [("gs:test:out:" + d.stream.rsplit(":", 1)[-1], d.message) for d in batch]
async def main():
    r = aioredis.Redis.from_url({url!r})
    c = Consumer(r, group={group!r}, consumer="victim", streams=STREAMS, handler=handler,
                 batch_size=40, block_ms=20, claim_interval_s=3600, retry_backoff_s=0.01)
    await c.run()
asyncio.run(main())
"""


async def test_order_holds_through_a_crash_and_a_reclaim_with_one_stream_blocked(r, redis_url):
    """A replica is SIGKILLed mid-run holding entries of several streams (and the blocked
    stream's head); another takes them over by reclaim. The four streams still deliver
    everything once and in order, the blocked one keeps waiting."""
    msgs = {s: ticks(400, sym) for s, sym in zip(STREAMS, SYMBOLS, strict=True)}
    await Producer(r).publish([(s, m) for s in STREAMS for m in msgs[s]])
    await consumer(r, handler=Blocking()).ensure_groups()
    script = textwrap.dedent(
        _VICTIM.format(streams=STREAMS, blocked=BLOCKED, die_at=6, url=redis_url, group=GROUP)
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        assert line.strip() == "holding"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    held_by_victim = 0
    for s in STREAMS:
        held_by_victim += await age(r, s, "victim")
    assert held_by_victim > 0
    h = Blocking()
    survivor = consumer(r, name="survivor", handler=h, claim_interval_s=0.0, claim_pages=2)
    others = [s for s in STREAMS if s != BLOCKED]

    async def done() -> bool:
        for s in others:
            if len(await outputs(r, s)) < 400:
                return False
        return True

    await until(done, step=survivor.run_once)
    for s in others:
        assert await outputs(r, s) == [m.id for m in msgs[s]]  # once each, in order
    assert await r.xlen(out_of(BLOCKED)) == 0
    assert await r.xlen(S.dead_letters(GROUP)) == 0
    victims = await r.xpending(BLOCKED, GROUP)
    assert {c["name"] for c in victims["consumers"]} == {b"survivor"}


async def test_reclaim_walks_the_whole_pending_list_across_ticks(r):
    """XAUTOCLAIM scans a bounded number of entries per call: idle entries far down a long
    pending list are reached over several timer ticks, the cursor carried between them."""
    stream = STREAMS[0]
    msgs = ticks(2050, SYMBOLS[0])
    await Producer(r).publish([(stream, m) for m in msgs])
    await r.xgroup_create(stream, GROUP, id="0")
    await r.xreadgroup(GROUP, "busy", {stream: ">"}, count=2000)  # fresh, not idle
    await r.xreadgroup(GROUP, "dead", {stream: ">"}, count=50)
    await age(r, stream, "dead")
    h = Blocking(blocked=None)
    c = consumer(r, streams=[stream], name="survivor", handler=h, batch_size=10, claim_pages=1)
    c.claim_interval_s = 0.0
    passes = 0

    async def got_all() -> bool:
        return len(h.handled[stream]) >= 50

    async def step() -> None:
        nonlocal passes
        passes += 1
        await c.run_once()

    await until(got_all, step=step)
    assert h.handled[stream] == [m.id for m in msgs[2000:]]
    assert passes >= 20  # 2000 entries at most 100 per call: it took many ticks
    busy = await r.xpending_range(stream, GROUP, min="-", max="+", count=3000, consumername="busy")
    assert len(busy) == 2000  # the live consumer's entries were not taken
    # one delivery to the dead consumer, one to the survivor's handler
    assert {m[2] for m in h.count_mismatches} == {2} and len(h.count_mismatches) == 50


async def test_delivery_counts_equal_handler_sightings_under_mixed_failures(r):
    streams = STREAMS[:3]
    msgs = {s: ticks(60, s.rsplit(":", 1)[-1]) for s in streams}
    await Producer(r).publish([(s, m) for s in streams for m in msgs[s]])
    sightings: dict[tuple[str, bytes], int] = defaultdict(int)
    mismatches: list[tuple[str, bytes, int, int]] = []
    failures: dict[str, int] = {}
    for s in streams:
        failures[msgs[s][7].id] = 2  # fails twice with a bug, then passes
        failures[msgs[s][30].id] = 3  # three RetryLater, then passes
    poison = msgs[streams[1]][45].id  # never passes: dead-lettered
    handled: dict[str, list[str]] = defaultdict(list)

    async def handler(batch):
        for d in batch:
            key = (d.stream, d.entry_id)
            sightings[key] += 1
            if d.deliveries != sightings[key]:
                mismatches.append((*key, d.deliveries, sightings[key]))
        for d in batch:
            if d.message.id == poison:
                raise ValueError("poison")
            left = failures.get(d.message.id, 0)
            if left:
                failures[d.message.id] = left - 1
                if d.message.trade_id == 30:
                    raise bus.RetryLater("later")
                raise ValueError("bug")
        for d in batch:
            handled[d.stream].append(d.message.id)
        return []

    c = consumer(r, streams=streams, handler=handler, batch_size=16, max_deliveries=4)
    await c.ensure_groups()

    async def finished() -> bool:
        pending = sum([(await r.xpending(s, GROUP))["pending"] for s in streams])
        return pending == 0 and all(len(handled[s]) >= 59 for s in streams)

    await until(finished, step=c.run_once)
    assert mismatches == []
    for s in streams:
        expected = [m.id for m in msgs[s] if m.id != poison]
        assert handled[s] == expected
    dead = await r.xrange(S.dead_letters(GROUP))
    assert len(dead) == 1
    fields = dead[0][1]
    assert codec.decode(fields[bus.DLQ_PAYLOAD]).id == poison
    key = (fields[bus.DLQ_STREAM].decode(), fields[bus.DLQ_ENTRY])
    assert int(fields[bus.DLQ_DELIVERIES]) == sightings[key] == 4


async def test_a_trimmed_pending_entry_is_recorded_as_lost_not_dead_lettered(r, caplog):
    stream = STREAMS[0]
    await Producer(r).publish([(stream, m) for m in ticks(10, SYMBOLS[0])])
    await r.xgroup_create(stream, GROUP, id="0")
    await r.xreadgroup(GROUP, "c1", {stream: ">"}, count=6)  # read, then the replica died
    await r.xreadgroup(GROUP, "other", {stream: ">"}, count=4)
    await age(r, stream, "other")
    await r.xtrim(stream, maxlen=0)  # an over-eager trim removed them
    before = metrics.LOST_ENTRIES.labels(GROUP, stream)._value.get()
    h = Blocking(blocked=None)
    c = consumer(r, streams=[stream], handler=h, claim_interval_s=0.0)
    with caplog.at_level(logging.ERROR, logger="gridstream.bus"):
        for _ in range(3):
            await c.run_once()
    assert c.lost == 10
    assert metrics.LOST_ENTRIES.labels(GROUP, stream)._value.get() - before == 10
    assert "lost 10 pending entries" in caplog.text  # taken from "other" and own: one walk
    assert await r.xlen(S.dead_letters(GROUP)) == 0
    assert (await r.xpending(stream, GROUP))["pending"] == 0
    assert h.sightings == {}


async def test_a_message_of_the_wrong_kind_is_dead_lettered_with_its_reason(r):
    stream = STREAMS[0]
    good = ticks(2, SYMBOLS[0])
    await Producer(r).publish([(stream, good[0])])
    await r.xadd(stream, {codec.FIELD: codec.encode(candle(symbol=SYMBOLS[0]))})
    await Producer(r).publish([(stream, good[1])])
    h = Blocking(blocked=None)
    c = consumer(r, streams=[stream], handler=h)
    await c.ensure_groups()
    await until(lambda: _eq(h.handled, stream, 2), step=c.run_once)
    assert h.handled[stream] == [g.id for g in good]
    dead = await r.xrange(S.dead_letters(GROUP))
    assert len(dead) == 1
    assert (
        dead[0][1][bus.DLQ_REASON].decode().startswith(f"kind: candle does not belong on {stream}")
    )
    with pytest.raises(bus.WrongKind):
        await Producer(r).publish([(stream, candle(symbol=SYMBOLS[0]))])


async def test_oversized_entries_are_refused_and_dead_lettered_by_reference(r):
    stream = STREAMS[0]
    big = tick(symbol=SYMBOLS[0], id="x" * 5000)
    with pytest.raises(bus.EntryTooLarge):
        await Producer(r, max_entry_bytes=1000).publish(
            [(stream, tick(symbol=SYMBOLS[0])), (stream, big)]
        )
    assert await r.xlen(stream) == 0  # nothing of the refused batch was added
    entry_id = await r.xadd(stream, {codec.FIELD: codec.encode(big)})  # a writer without limit
    small = tick(symbol=SYMBOLS[0])
    await Producer(r).publish([(stream, small)])
    for g in ("g1", "g2"):
        await r.xgroup_create(stream, g, id="0")
    for g in ("g1", "g2"):
        h = Blocking(blocked=None)
        c = Consumer(
            r, group=g, consumer="c", streams=[stream], handler=h, block_ms=10, max_entry_bytes=1000
        )
        await until(lambda h=h: _eq(h.handled, stream, 1), step=c.run_once)
        assert h.handled[stream] == [small.id]
        ((_, fields),) = await r.xrange(S.dead_letters(g))
        assert fields[bus.DLQ_ENTRY] == entry_id
        assert fields[bus.DLQ_PAYLOAD] == b""  # by reference, not a copy
        assert int(fields[bus.DLQ_SIZE]) == len(codec.encode(big))
        assert fields[bus.DLQ_REASON].startswith(b"size:")
    assert await r.xlen(stream) == 2  # the entry itself is still there to inspect


async def test_replay_goes_back_only_to_the_group_that_dead_lettered(r):
    stream = STREAMS[0]
    msgs = ticks(3, SYMBOLS[0])
    await Producer(r).publish([(stream, m) for m in msgs])
    broken = {"on": True}
    seen: dict[str, list[str]] = defaultdict(list)

    def handler_for(g: str):
        async def handler(batch):
            for d in batch:
                if g == "ga" and broken["on"] and d.message.id == msgs[1].id:
                    raise ValueError("bug in ga")
            seen[g].extend(d.message.id for d in batch)
            return []

        return handler

    a = Consumer(
        r,
        group="ga",
        consumer="a",
        streams=[stream],
        handler=handler_for("ga"),
        block_ms=10,
        max_deliveries=1,
        retry_backoff_s=0,
    )
    b = Consumer(
        r, group="gb", consumer="b", streams=[stream], handler=handler_for("gb"), block_ms=10
    )
    await a.ensure_groups()
    await b.ensure_groups()

    async def settled() -> bool:
        pend = [(await r.xpending(stream, g))["pending"] for g in ("ga", "gb")]
        return pend == [0, 0] and len(seen["gb"]) == 3 and len(seen["ga"]) == 2

    async def both() -> None:
        await a.run_once()
        await b.run_once()

    await until(settled, step=both)
    assert await r.xlen(S.dead_letters("ga")) == 1
    broken["on"] = False
    assert await bus.replay_dead_letters(r, "ga") == 1

    async def replayed() -> bool:
        pend = [(await r.xpending(stream, g))["pending"] for g in ("ga", "gb")]
        return (
            len(seen["ga"]) == 3
            and pend == [0, 0]
            and (await r.xinfo_groups(stream))[1]["lag"] == 0
        )

    await until(replayed, step=both)
    assert seen["ga"] == [msgs[0].id, msgs[2].id, msgs[1].id]
    assert seen["gb"] == [m.id for m in msgs]  # gb did not see the replayed copy


async def test_trim_keeps_what_any_group_still_needs(r):
    stream = STREAMS[0]
    msgs = ticks(100, SYMBOLS[0])
    await Producer(r, create_groups=False).publish([(stream, m) for m in msgs])
    ids = [eid for eid, _ in await r.xrange(stream)]
    await r.xgroup_create(stream, "g1", id="0")
    await r.xgroup_create(stream, "g2", id="0")
    got = await r.xreadgroup("g1", "c", {stream: ">"}, count=60)
    read = [eid for eid, _ in got[0][1]]
    await r.xack(stream, "g1", *read[:50])  # g1: 50 done, 10 pending, 40 undelivered
    now_ms = int(time.time() * 1000) + 60_000
    assert await bus.trim_safely(r, stream, retention_ms=0, now_ms=now_ms) == 0  # g2 needs all
    got = await r.xreadgroup("g2", "c", {stream: ">"}, count=100)
    await r.xack(stream, "g2", *[eid for eid, _ in got[0][1]])
    assert await bus.trim_safely(r, stream, retention_ms=0, now_ms=now_ms) == 50
    assert (await r.xrange(stream, count=1))[0][0] == ids[50]  # g1's oldest pending entry
    # retention keeps recent entries even once every group has them
    await r.xack(stream, "g1", *read[50:])
    assert await bus.trim_safely(r, stream, retention_ms=3_600_000, now_ms=now_ms) == 0
    got = await r.xreadgroup("g1", "c", {stream: ">"}, count=100)
    await r.xack(stream, "g1", *[eid for eid, _ in got[0][1]])
    assert await bus.trim_safely(r, stream, retention_ms=0, now_ms=now_ms) == 50
    assert await r.xlen(stream) == 0


async def test_a_producer_creates_the_durable_consumer_groups(r):
    stream = S.stream(S.Kind.CANDLES, "BTCUSDT")
    await Producer(r).publish([(stream, candle())])
    names = {g["name"].decode() for g in await r.xinfo_groups(stream)}
    assert names == {S.group(s) for s in S.CONSUMERS[S.Kind.CANDLES]}
    # a consumer started later still finds the entry
    h = Blocking(blocked=None)
    c = Consumer(
        r, group=S.group(S.Service.SIGNALS), consumer="s", streams=[stream], handler=h, block_ms=10
    )
    await until(lambda: _eq(h.handled, stream, 1), step=c.run_once)


async def test_a_commit_is_fenced_by_the_lease_it_needs(r):
    stream = STREAMS[0]
    await Producer(r).publish([(stream, m) for m in ticks(5, SYMBOLS[0])])
    lease = "gs:test:lease:AAAUSDT"
    await r.set(lease, "other-replica")
    lost: list[str] = []
    h = Blocking(blocked=None)
    c = consumer(r, streams=[stream], handler=h, fence=lambda s: (lease, "me"))
    c.on_lease_lost = lost.append
    await c.ensure_groups()
    with pytest.raises(bus.LeaseLost):
        await until(lambda: _false(), step=c.run_once)
    assert lost == [lease]
    assert await r.xlen(out_of(stream)) == 0  # nothing was written
    assert (await r.xpending(stream, GROUP))["pending"] == 5  # nor acknowledged
    await r.set(lease, "me")
    await until(lambda: _eq(h.handled, stream, 10), step=c.run_once)
    assert len(await outputs(r, stream)) == 5


def test_the_commit_script_names_its_fields_from_the_constants():
    src = bus.CommitScript.source
    for name in (
        codec.FIELD,
        bus.DLQ_STREAM,
        bus.DLQ_ENTRY,
        bus.DLQ_REASON,
        bus.DLQ_PAYLOAD,
        bus.DLQ_SIZE,
    ):
        assert f"'{name.decode()}'" in src
    assert "$" not in src  # every placeholder was filled
    assert msgspec.msgpack.decode(codec.encode(tick()))["kind"] == "tick"


async def test_a_service_trims_its_output_streams_only_of_what_its_consumers_have(redis_url):
    from gridstream.common.runtime import Runtime
    from gridstream.common.settings import CommonSettings

    settings = CommonSettings(redis_url=redis_url, symbols=["BTCUSDT"], stream_retention_s=0)
    rt = Runtime(S.Service.SIGNALS, settings)
    try:
        out = S.stream(S.Kind.SIGNALS, "BTCUSDT")
        from .factories import signal

        await rt.producer.publish([(out, signal(open_time=i * 60_000)) for i in range(10)])
        assert await rt.trim_outputs() == 0  # the strategy group has read nothing yet
        got = await rt.redis.xreadgroup(S.group(S.Service.STRATEGY), "s-0", {out: ">"}, count=6)
        ids = [eid for eid, _ in got[0][1]]
        await rt.redis.xack(out, S.group(S.Service.STRATEGY), *ids)
        # retention 0 keeps what is newer than now: the clock must have left the
        # millisecond of the acknowledged entries (all ten may share it), with a deadline
        newest_ms = int(ids[-1].split(b"-")[0])
        deadline = time.monotonic() + 10
        while time.time_ns() // 1_000_000 <= newest_ms:
            assert time.monotonic() < deadline, "the clock did not move past the entries"
            await asyncio.sleep(0.001)
        assert await rt.trim_outputs() == 6
        assert await rt.redis.xlen(out) == 4
    finally:
        await rt.redis.aclose()
