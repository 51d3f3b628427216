"""The bus against a real Redis: takeover, pending re-read, dead letters, effects once, bounds."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Sequence

import asyncpg
import pytest
import redis.asyncio as aioredis

from gridstream.common import bus, codec
from gridstream.common import streams as S
from gridstream.common.bus import Consumer, Delivery, Producer

from .factories import candle, tick

IN = S.stream(S.Kind.TICKS, "BTCUSDT")
IN2 = S.stream(S.Kind.TICKS, "ETHUSDT")
OUT = "gs:test:out"  # a stream of no kind: it takes any message
GROUP = "testsvc"


def ticks(n: int, start: int = 0, symbol: str = "BTCUSDT"):
    return [tick(trade_id=i, symbol=symbol) for i in range(start, start + n)]


async def echo(batch: Sequence[Delivery]):
    return [(OUT, d.message) for d in batch]


def consumer(r, name="c1", handler=echo, **kw) -> Consumer:
    opts = dict(
        batch_size=100,
        block_ms=20,
        max_deliveries=3,
        claim_idle_ms=60_000,
        claim_interval_s=3600,
        retry_backoff_s=0.0,
    )
    opts.update(kw)
    return Consumer(r, group=GROUP, consumer=name, streams=[IN], handler=handler, **opts)


async def drain(c: Consumer, timeout_s: float = 60.0) -> None:
    """Run the consumer until it is idle with nothing of its own pending (or fail at the
    deadline): no fixed number of passes, so back-offs and one-by-one re-reads finish."""
    idle = 0
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        n = await c.run_once()
        idle = idle + 1 if n == 0 else 0
        if idle >= 2 and not await _own_pending(c):
            return
    raise AssertionError(f"consumer {c.consumer} did not drain within {timeout_s}s")


async def _own_pending(c: Consumer) -> int:
    total = 0
    for stream in c.streams:
        try:
            rows = await c.redis.xpending_range(
                stream, c.group, min="-", max="+", count=1000, consumername=c.consumer
            )
        except Exception:
            continue
        total += len(rows) - sum(1 for row in rows if c.is_held(stream, row["message_id"]))
    return total


async def out_ids(r) -> list[str]:
    return [codec.decode(f[codec.FIELD]).id for _, f in await r.xrange(OUT)]


@pytest.fixture
async def r(redis_url):
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


async def test_outputs_once_per_input_and_inputs_acknowledged(r):
    msgs = ticks(250)
    await Producer(r).publish([(IN, m) for m in msgs])
    c = consumer(r)
    await c.ensure_groups()
    await drain(c)
    assert await out_ids(r) == [m.id for m in msgs]
    assert (await r.xpending(IN, GROUP))["pending"] == 0


async def test_restarted_replica_rereads_its_own_pending_entries_first(r):
    msgs = ticks(10)
    await Producer(r).publish([(IN, m) for m in msgs])
    c = consumer(r, name="svc-0")
    await c.ensure_groups()
    # The replica read 10 entries and died before acknowledging them.
    await r.xreadgroup(GROUP, "svc-0", {IN: ">"}, count=10)
    more = ticks(5, start=10)
    await Producer(r).publish([(IN, m) for m in more])
    restarted = consumer(r, name="svc-0")
    first = await restarted.run_once()
    assert first == 10  # own pending, before anything new
    assert await out_ids(r) == [m.id for m in msgs]
    await drain(restarted)
    assert await out_ids(r) == [m.id for m in msgs + more]


async def test_killed_replica_is_taken_over_by_another(r, redis_url):
    """A real replica process is SIGKILLed holding pending entries; another reclaims them."""
    msgs = ticks(300)
    await Producer(r).publish([(IN, m) for m in msgs])
    await consumer(r).ensure_groups()
    script = textwrap.dedent(
        f"""
        import asyncio, redis.asyncio as aioredis
        from gridstream.common.bus import Consumer
        async def stuck(batch):
            print("got", len(batch), flush=True)
            await asyncio.sleep(3600)  # dies while handling: nothing acknowledged
        async def main():
            r = aioredis.Redis.from_url({redis_url!r})
            c = Consumer(r, group={GROUP!r}, consumer="victim", streams=[{IN!r}],
                         handler=stuck, batch_size=120, block_ms=50, claim_interval_s=3600)
            await c.run()
        asyncio.run(main())
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        assert line.startswith("got 120")
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    pending = await r.xpending(IN, GROUP)
    assert pending["pending"] == 120
    assert {c["name"] for c in pending["consumers"]} == {b"victim"}
    await age(r, "victim", 120_000)
    survivor = consumer(r, name="survivor", claim_idle_ms=60_000, claim_interval_s=0.0)
    await drain(survivor)
    got = await out_ids(r)
    assert sorted(got) == sorted(m.id for m in msgs)
    assert len(got) == len(set(got)) == 300
    assert (await r.xpending(IN, GROUP))["pending"] == 0


async def test_undecodable_entry_is_dead_lettered_with_reason_and_the_rest_flows(r):
    good = ticks(3)
    await Producer(r).publish([(IN, good[0])])
    await r.xadd(IN, {codec.FIELD: b"\x93not-a-message"})
    await r.xadd(IN, {b"other": b"field"})
    await Producer(r).publish([(IN, g) for g in good[1:]])
    c = consumer(r)
    await c.ensure_groups()
    await drain(c)
    assert await out_ids(r) == [g.id for g in good]
    dead = await r.xrange(S.dead_letters(GROUP))
    assert len(dead) == 2
    reasons = [f[bus.DLQ_REASON].decode() for _, f in dead]
    assert all(r_.startswith("decode:") for r_ in reasons)
    assert dead[0][1][bus.DLQ_PAYLOAD] == b"\x93not-a-message"
    assert dead[0][1][bus.DLQ_STREAM] == IN.encode()
    assert (await r.xpending(IN, GROUP))["pending"] == 0


async def test_poison_entry_fails_n_times_then_dead_letters_and_order_is_kept(r):
    msgs = ticks(6)
    poison = msgs[2]
    seen: list[str] = []

    async def handler(batch):
        for d in batch:
            if d.message.id == poison.id:
                raise ValueError("cannot handle this one")
        seen.extend(d.message.id for d in batch)
        return [(OUT, d.message) for d in batch]

    await Producer(r).publish([(IN, m) for m in msgs])
    c = consumer(r, handler=handler, max_deliveries=3)
    await c.ensure_groups()
    await drain(c)
    dead = await r.xrange(S.dead_letters(GROUP))
    assert len(dead) == 1
    assert dead[0][1][bus.DLQ_REASON].decode() == "handler: ValueError: cannot handle this one"
    assert int(dead[0][1][bus.DLQ_DELIVERIES]) == 3
    assert codec.decode(dead[0][1][bus.DLQ_PAYLOAD]) == poison
    # Everything else went through exactly once and in order (nothing after the poison
    # entry overtook it while it was being retried).
    expected = [m.id for m in msgs if m.id != poison.id]
    assert await out_ids(r) == expected
    assert (await r.xpending(IN, GROUP))["pending"] == 0


async def test_effects_happen_once_across_a_crash_between_effect_and_ack(r, database_url):
    """Durable effect keyed by message id first; crash before the ack; redelivery."""
    pg = await asyncpg.connect(database_url)
    await pg.execute("CREATE TABLE effects (msg_id text PRIMARY KEY, n int)")
    crash_once = {"armed": True}

    async def handler(batch):
        await pg.executemany(
            "INSERT INTO effects VALUES ($1, 1) ON CONFLICT (msg_id) DO NOTHING",
            [(d.message.id,) for d in batch],
        )
        if crash_once["armed"]:
            crash_once["armed"] = False
            raise ConnectionError("process died after the effect, before the ack")
        return [(OUT, candle(id=f"out-{d.message.id}")) for d in batch]

    msgs = ticks(50)
    await Producer(r).publish([(IN, m) for m in msgs])
    c = consumer(r, handler=handler)
    await c.ensure_groups()
    await drain(c)
    rows = await pg.fetch("SELECT msg_id, n FROM effects")
    await pg.close()
    assert len(rows) == 50 and all(row["n"] == 1 for row in rows)
    outs = await out_ids(r)
    assert sorted(outs) == sorted(f"out-{m.id}" for m in msgs)
    assert len(outs) == len(set(outs))


async def test_every_xadd_is_bounded(r):
    p = Producer(r, maxlen=1000)
    for _ in range(5):
        await p.publish([(IN, m) for m in ticks(1000)])
    assert 1000 <= await r.xlen(IN) < 2500
    c = consumer(r, bounds={S.Kind.TICKS: 500})
    await c.ensure_groups()
    await drain(c)
    assert 500 <= await r.xlen(OUT) < 1500


async def test_several_streams_are_read_by_one_consumer(r):
    a, b = ticks(20), ticks(20, symbol="ETHUSDT")
    await Producer(r).publish([(IN, m) for m in a] + [(IN2, m) for m in b])
    seen: dict[str, list[str]] = {}

    async def handler(batch):
        for d in batch:
            seen.setdefault(d.stream, []).append(d.message.id)
        return []

    c = Consumer(r, group=GROUP, consumer="c", streams=[IN, IN2], handler=handler, block_ms=10)
    await c.ensure_groups()
    await drain(c)
    assert seen == {IN: [m.id for m in a], IN2: [m.id for m in b]}


async def test_dead_letters_can_be_replayed(r):
    msgs = ticks(2)
    broken = {"on": True}

    async def handler(batch):
        if broken["on"]:
            raise RuntimeError("bug")
        return [(OUT, d.message) for d in batch]

    await Producer(r).publish([(IN, m) for m in msgs])
    c = consumer(r, handler=handler, max_deliveries=1)
    await c.ensure_groups()
    await drain(c)
    assert await r.xlen(S.dead_letters(GROUP)) == 2
    broken["on"] = False
    assert await bus.replay_dead_letters(r, GROUP) == 2
    assert await r.xlen(S.dead_letters(GROUP)) == 0
    await drain(c)
    assert await out_ids(r) == [m.id for m in msgs]


async def test_stop_finishes_the_batch_in_hand(r):
    msgs = ticks(30)
    await Producer(r).publish([(IN, m) for m in msgs])
    c = consumer(r, batch_size=10)

    async def slow(batch):
        await asyncio.sleep(0.05)
        c.stop()
        return [(OUT, d.message) for d in batch]

    c.handler = slow
    await asyncio.wait_for(c.run(), 5)
    assert len(await out_ids(r)) == 10
    info = await r.xpending(IN, GROUP)
    assert info["pending"] == 0  # nothing read beyond the batch in hand


async def test_undecodable_dead_letters_are_not_replayed(r):
    await r.xadd(IN, {codec.FIELD: b"garbage"})
    c = consumer(r)
    await c.ensure_groups()
    await drain(c)
    await r.xadd(S.dead_letters(GROUP), {bus.DLQ_STREAM: b"btcusdt@trade", bus.DLQ_PAYLOAD: b"{}"})
    assert await bus.replay_dead_letters(r, GROUP) == 0
    assert await r.xlen(S.dead_letters(GROUP)) == 2
    assert await r.xlen(IN) == 1


async def test_commit_survives_a_script_cache_flush(r):
    """After a Redis restart the script cache is empty (NOSCRIPT): it is loaded again."""
    c = consumer(r)
    await c.ensure_groups()
    await Producer(r).publish([(IN, m) for m in ticks(5)])
    await r.script_flush()
    await drain(c)
    assert len(await out_ids(r)) == 5
    await r.script_flush()
    await Producer(r).publish([(IN, m) for m in ticks(5, start=5)])
    await drain(c)
    assert len(await out_ids(r)) == 10


# -- manual acknowledgement ----------------------------------------------------------------


class Holder:
    """A handler for manual mode: keeps every delivery it was handed, outputs nothing."""

    def __init__(self, fail_ids: Sequence[str] = ()) -> None:
        self.got: list[Delivery] = []
        self.fail_ids = set(fail_ids)

    async def __call__(self, batch: Sequence[Delivery]):
        for d in batch:
            if d.message.id in self.fail_ids:
                raise ValueError("not yet")
        self.got.extend(batch)
        return []

    def ids(self) -> list[str]:
        return [d.message.id for d in self.got]


def manual(r, name: str = "c1", handler=None, **kw) -> Consumer:
    return consumer(r, name=name, handler=handler or Holder(), ack="manual", **kw)


async def pending_of(r, name: str | None = None) -> int:
    info = await r.xpending(IN, GROUP)
    if name is None:
        return int(info["pending"])
    return sum(int(c["pending"]) for c in info["consumers"] if c["name"] == name.encode())


async def test_manual_mode_holds_entries_until_ack(r):
    msgs = ticks(10)
    await Producer(r).publish([(IN, m) for m in msgs])
    h = Holder()
    c = manual(r, handler=h, batch_size=4)
    await c.ensure_groups()
    await drain(c)
    assert h.ids() == [m.id for m in msgs]
    assert c.held == 10
    assert await pending_of(r) == 10  # handled, not acknowledged
    assert await c.ack(h.got[:4]) == 4
    assert await pending_of(r) == 6 and c.held == 6
    # ids as (stream, str) pairs work too, and outputs go with the ack
    rest = [(d.stream, d.entry_id.decode()) for d in h.got[4:]]
    assert await c.ack(rest, outputs=[(OUT, msgs[0])]) == 6
    assert await pending_of(r) == 0 and c.held == 0
    assert await out_ids(r) == [msgs[0].id]


async def test_manual_mode_does_not_reread_held_entries_while_running(r):
    """A failure sends the consumer back to its pending history: held entries are skipped."""
    msgs = ticks(8)
    await Producer(r).publish([(IN, m) for m in msgs[:5]])
    h = Holder(fail_ids=[msgs[6].id])
    c = manual(r, handler=h, batch_size=100)
    await c.ensure_groups()
    await drain(c)
    assert h.ids() == [m.id for m in msgs[:5]]
    await Producer(r).publish([(IN, m) for m in msgs[5:]])
    await c.run_once()  # 5, 6, 7 read together; 6 fails: nothing of that call is held
    assert h.ids() == [m.id for m in msgs[:5]]
    h.fail_ids.clear()
    await drain(c)
    # 5, 6 and 7 came back from the pending history, in order, once each; the five held
    # entries were never handed to the handler again
    assert h.ids() == [m.id for m in msgs]
    assert c.held == 8 and await pending_of(r) == 8
    await c.ack(h.got)
    assert await pending_of(r) == 0


async def test_manual_mode_held_entries_are_reread_after_a_crash(r):
    msgs = ticks(6)
    await Producer(r).publish([(IN, m) for m in msgs])
    first = Holder()
    c = manual(r, name="arch-0", handler=first)
    await c.ensure_groups()
    await drain(c)
    await c.ack(first.got[:2])
    # the replica dies holding 4; restarted under the same name it reads them first
    more = ticks(2, start=6)
    await Producer(r).publish([(IN, m) for m in more])
    again = Holder()
    restarted = manual(r, name="arch-0", handler=again)
    assert await restarted.run_once() == 4
    assert again.ids() == [m.id for m in msgs[2:]]
    await drain(restarted)
    assert again.ids() == [m.id for m in msgs[2:] + more]
    await restarted.ack(again.got)
    assert await pending_of(r) == 0


async def age(r, consumer_name: str, idle_ms: int) -> None:
    """Make every pending entry of ``consumer_name`` look idle for ``idle_ms`` (XCLAIM IDLE,
    JUSTID: owner and delivery count unchanged), instead of waiting that long."""
    rows = await r.xpending_range(
        IN, GROUP, min="-", max="+", count=1000, consumername=consumer_name
    )
    ids = [row["message_id"] for row in rows]
    if ids:
        await r.xclaim(IN, GROUP, consumer_name, 0, ids, idle=idle_ms, justid=True)


async def test_manual_mode_another_replica_claims_held_entries_only_after_idle(r):
    msgs = ticks(5)
    await Producer(r).publish([(IN, m) for m in msgs])
    a_h, b_h = Holder(), Holder()
    # claim tick on every pass; batch size 2: touching and claiming both go page by page
    opts = {"claim_interval_s": 0.0, "claim_idle_ms": 60_000, "batch_size": 2}
    a = manual(r, name="a", handler=a_h, **opts)
    b = manual(r, name="b", handler=b_h, **opts)
    await a.ensure_groups()
    await drain(a)
    assert a.held == 5
    # A is alive: its claim tick touches what it holds, so B takes nothing even though
    # the entries had been idle for two minutes
    await age(r, "a", 120_000)
    await a.run_once()
    await b.run_once()
    assert b_h.got == [] and await pending_of(r, "a") == 5
    # touching counts no delivery
    rows = await r.xpending_range(IN, GROUP, min="-", max="+", count=10)
    assert {int(row["times_delivered"]) for row in rows} == {1}
    # A dies (no more touching); once its entries are idle past claim_idle_ms, B has them
    await age(r, "a", 120_000)
    await drain(b)
    assert b_h.ids() == [m.id for m in msgs]
    assert b.held == 5 and await pending_of(r, "b") == 5 and await pending_of(r) == 5
    assert [d.deliveries for d in b_h.got] == [2] * 5  # one delivery to A, one to B
    await b.ack(b_h.got)
    assert await pending_of(r) == 0


async def test_manual_mode_dead_letter_and_ack_with_batch(r):
    msgs = ticks(4)
    await Producer(r).publish([(IN, m) for m in msgs])
    await r.xadd(IN, {codec.FIELD: b"\xc1junk"})
    kept: list[Delivery] = []
    c: Consumer

    async def handler(batch: Sequence[Delivery]):
        odd = [d for d in batch if d.message.trade_id % 2]
        c.ack_with_batch(odd)  # not wanted: acknowledged in this batch's commit
        kept.extend(d for d in batch if not d.message.trade_id % 2)
        return [(OUT, d.message) for d in batch]

    c = manual(r, handler=handler)
    await c.ensure_groups()
    await drain(c)
    assert await out_ids(r) == [m.id for m in msgs]
    assert c.held == 2 and await pending_of(r) == 2  # the junk is dead-lettered and acked
    await c.dead_letter(kept[0], "archive: cannot write")
    dead = await r.xrange(S.dead_letters(GROUP))
    assert [f[bus.DLQ_REASON] for _, f in dead][-1] == b"archive: cannot write"
    assert codec.decode(dead[-1][1][bus.DLQ_PAYLOAD]) == msgs[0]
    assert c.held == 1 and await pending_of(r) == 1
    await c.ack(kept[1:])
    assert await pending_of(r) == 0 and c.held == 0


async def test_a_dependency_outage_dead_letters_nothing(r):
    """A database/venue outage is not the entries' fault: they wait, then flow once each."""
    msgs = ticks(10)
    down_until = time.monotonic() + 1.0
    calls = {"n": 0}

    async def handler(batch):
        calls["n"] += 1
        if time.monotonic() < down_until:
            raise ConnectionRefusedError("postgres is restarting")
        return [(OUT, d.message) for d in batch]

    await Producer(r).publish([(IN, m) for m in msgs])
    c = consumer(r, handler=handler, max_deliveries=2, retry_backoff_s=0.05)
    await c.ensure_groups()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(await out_ids(r)) < 10:
        await c.run_once()
    assert await r.xlen(S.dead_letters(GROUP)) == 0
    assert await out_ids(r) == [m.id for m in msgs]
    assert calls["n"] > 3  # it did retry through the outage
    # only the head entry was probed during the outage: the others were delivered at most
    # twice (the first batch read and the read after recovery)
    pending_counts = await r.xpending_range(IN, GROUP, min="-", max="+", count=100)
    assert pending_counts == []


async def test_retry_later_is_never_dead_lettered_and_keeps_order(r):
    msgs = ticks(4)
    refusals = {"left": 6}

    async def handler(batch):
        out = []
        for d in batch:
            if d.message.id == msgs[1].id and refusals["left"] > 0:
                refusals["left"] -= 1
                raise bus.RetryLater("venue rate limit: retry after 0s")
            out.append((OUT, d.message))
        return out

    await Producer(r).publish([(IN, m) for m in msgs])
    c = consumer(r, handler=handler, max_deliveries=2)
    await c.ensure_groups()
    await drain(c)
    assert await r.xlen(S.dead_letters(GROUP)) == 0
    assert await out_ids(r) == [m.id for m in msgs]


async def test_only_the_failing_head_entry_accumulates_deliveries(r):
    """While a stream is blocked, re-reads probe one entry, so the entries behind the
    failing one are not pushed toward the dead-letter limit by its retries."""
    msgs = ticks(5)
    poison = msgs[0]
    follower_deliveries: list[int] = []

    async def handler(batch):
        for d in batch:
            if d.message.id == poison.id:
                raise ValueError("bad entry")
        follower_deliveries.extend(d.deliveries for d in batch)
        return [(OUT, d.message) for d in batch]

    await Producer(r).publish([(IN, m) for m in msgs])
    c = consumer(r, handler=handler, max_deliveries=4)
    await c.ensure_groups()
    await drain(c)
    dead = await r.xrange(S.dead_letters(GROUP))
    assert [codec.decode(f[bus.DLQ_PAYLOAD]).id for _, f in dead] == [poison.id]
    assert int(dead[0][1][bus.DLQ_DELIVERIES]) == 4
    assert await out_ids(r) == [m.id for m in msgs[1:]]
    assert max(follower_deliveries) <= 2


async def test_a_cancelled_consumer_stops_even_if_the_cancellation_is_swallowed(r):
    """Python 3.11's wait_for/timeout can swallow a cancel that races a completion; a
    handler may swallow one too. The loop must still end instead of running forever."""
    await Producer(r).publish([(IN, m) for m in ticks(3)])
    entered = asyncio.Event()

    async def swallowing(batch):
        entered.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            pass  # swallowed
        return []

    c = consumer(r, handler=swallowing)
    task = asyncio.create_task(c.run())
    await asyncio.wait_for(entered.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)


def test_group_behind_reads_ids_not_lag_which_a_trim_leaves_unknown(redis_url):
    import redis as sync_redis

    from gridstream.common.bus import group_behind

    r = sync_redis.Redis.from_url(redis_url)
    try:
        for i in range(5):
            r.xadd("gs:candles:TESTUSDT", {"n": i})
        r.xgroup_create("gs:candles:TESTUSDT", "g", id="0")

        def behind() -> bool:
            newest = r.xinfo_stream("gs:candles:TESTUSDT")["last-generated-id"]
            return group_behind(newest, r.xinfo_groups("gs:candles:TESTUSDT")[0])

        assert behind()  # nothing read
        got = r.xreadgroup("g", "c", {"gs:candles:TESTUSDT": ">"}, count=5)
        assert behind()  # read, not acknowledged
        r.xack("gs:candles:TESTUSDT", "g", *[eid for eid, _ in got[0][1]])
        assert not behind()
        gone = r.xadd("gs:candles:TESTUSDT", {"n": 5})
        r.xadd("gs:candles:TESTUSDT", {"n": 6})
        r.xdel("gs:candles:TESTUSDT", gone)  # deleted before delivery: lag becomes unknown
        assert r.xinfo_groups("gs:candles:TESTUSDT")[0]["lag"] is None
        assert behind()  # the new entry is still to deliver, whatever lag says
        got = r.xreadgroup("g", "c", {"gs:candles:TESTUSDT": ">"}, count=5)
        r.xack("gs:candles:TESTUSDT", "g", *[eid for eid, _ in got[0][1]])
        assert not behind()
    finally:
        r.close()
