"""The executor's answers to approvals: retry classes, redelivered filled orders, cancels."""

from __future__ import annotations

import asyncio
import time
from decimal import Decimal
from typing import Any

import asyncpg
import msgspec
import redis.asyncio as aioredis
from test_executor import (
    KEY,
    SECRET,
    SYMBOL,
    Sim,
    approved,
    exec_settings,
    executions,
    fetch,
    send,
    sim,
    start_executor,
    tick_price,
    wait_for,
)

from gridstream.common.binance import trading as bt
from gridstream.common.bus import RetryLater
from gridstream.common.ledger import LedgerStatus
from gridstream.common.messages import OrderAccepted, OrderCanceled, OrderFailed, OrderFilled
from gridstream.common.streams import Kind, Service, dead_letters, group, stream
from gridstream.executor.service import OutcomeStillUnknown, Stopping, VenueBusy
from gridstream.executor.venue import BinanceVenue

__all__ = ["sim"]  # the simulator fixture, shared with test_executor

D = Decimal


async def orders_consumed(redis_url: str) -> None:
    """Wait until the executor has read and acknowledged every approval."""
    client = aioredis.Redis.from_url(redis_url)
    name = stream(Kind.ORDERS, SYMBOL)
    try:
        deadline = time.monotonic() + 60
        while True:
            info = {g["name"].decode(): g for g in await client.xinfo_groups(name)}
            g = info.get(group(Service.EXECUTOR))
            if g is not None and g["lag"] == 0 and g["pending"] == 0:
                return
            assert time.monotonic() < deadline, f"executor did not consume {name}: {g}"
            await asyncio.sleep(0.05)
    finally:
        await client.aclose()


async def dead_lettered(redis_url: str) -> int:
    client = aioredis.Redis.from_url(redis_url)
    try:
        return int(await client.xlen(dead_letters(group(Service.EXECUTOR))))
    finally:
        await client.aclose()


class HiccupVenue(BinanceVenue):
    """The real venue, whose first placements meet a rate limit, an unreachable venue,
    a lost answer (the request never arrived) and a rate limit, before one goes through.

    (The bus calls a failing handler twice per delivery when it is not RetryLater: once
    for the batch, once to isolate the entry; four faults span two deliveries.)"""

    FAULTS = (
        bt.RateLimitedError(-1003, "Too many requests (injected)", 429, 0.05),
        bt.DefiniteError(0, "cannot connect (injected)", 0),
        bt.UnknownOutcome(0, "TimeoutError (injected)", 0),
        bt.RateLimitedError(-1003, "Too many requests (injected)", 429, 0.05),
    )

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.calls = 0

    async def place(self, **kw: Any) -> Any:
        self.calls += 1
        if self.calls <= len(self.FAULTS):
            raise self.FAULTS[self.calls - 1]
        return await super().place(**kw)


def test_not_now_errors_are_retry_later() -> None:
    for cls in (OutcomeStillUnknown, Stopping, VenueBusy):
        assert issubclass(cls, RetryLater)


async def test_venue_hiccups_are_retried_never_dead_lettered(
    sim: Sim, redis_url: str, database_url: str
) -> None:
    # Two deliveries would be enough to dead-letter an entry that fails by itself.
    settings = msgspec.structs.replace(
        exec_settings(redis_url, database_url, sim.url), max_deliveries=2
    )
    venue = HiccupVenue(
        name="simulator",
        rest_url=sim.url,
        ws_url=settings.venue_ws_url,
        api_key=KEY,
        api_secret=SECRET,
        reconnect_delay_s=0.1,
    )
    ex = await start_executor(settings, venue)
    try:
        order = approved("BUY", tick_price(sim.last * D("0.9")), "0.0005")
        await send(redis_url, order)

        async def accepted() -> bool:
            return any(isinstance(m, OrderAccepted) for m in await executions(redis_url))

        await wait_for(accepted, timeout=20, what="order accepted after the hiccups")
        assert venue.calls == 5
        assert await dead_lettered(redis_url) == 0
        placed = [
            o for o in sim.sim.engine.orders.values() if o.client_order_id == order.client_order_id
        ]
        assert len(placed) == 1
        rows = await fetch(database_url, "SELECT status FROM orders")
        assert [r["status"] for r in rows] == ["accepted"]
    finally:
        await ex.stop()


async def test_redelivered_approval_of_a_filled_order_does_not_reopen_it(
    sim: Sim, redis_url: str, database_url: str
) -> None:
    settings = exec_settings(redis_url, database_url, sim.url)
    ex = await start_executor(settings)
    try:
        order = approved("BUY", tick_price(sim.last * D("1.01")), "0.0005")
        await send(redis_url, order)

        async def filled() -> bool:
            rows = await fetch(database_url, "SELECT status FROM orders")
            return [r["status"] for r in rows] == ["filled"]

        await wait_for(filled, what="order filled")
        await orders_consumed(redis_url)

        async def fill_published() -> bool:
            unpublished = await fetch(
                database_url,
                "SELECT seq FROM fills WHERE published_at IS NULL"
                " UNION ALL SELECT seq FROM order_events WHERE published_at IS NULL",
            )
            return not unpublished and any(
                isinstance(m, OrderFilled) and m.client_order_id == order.client_order_id
                for m in await executions(redis_url)
            )

        # the fill out and the outbox empty: nothing of the first delivery is still to come
        await wait_for(fill_published, what="the fill on the executions stream, outbox empty")
        before = await executions(redis_url)
        await send(redis_url, order)  # at-least-once: the same approval again
        # acknowledged means handled: the executor commits its outputs with the ack
        await orders_consumed(redis_url)
        after = await executions(redis_url)
        assert after == before  # nothing that re-opens the order
        assert len(sim.sim.engine.orders) == 1
    finally:
        await ex.stop()


async def test_cancel_of_an_order_the_venue_does_not_know_leaves_it_unresolved(
    sim: Sim, redis_url: str, database_url: str
) -> None:
    settings = exec_settings(redis_url, database_url, sim.url)
    ex = await start_executor(settings)
    try:
        # A row written, its request not (yet) seen by the venue: an uncertain order.
        coid = "gs-in-flight-1"
        price = tick_price(sim.last * D("0.9"))
        conn = ex.rt.pool
        assert conn is not None
        await conn.execute(
            "INSERT INTO orders (client_order_id, intent_id, venue, symbol, side, price, qty,"
            " status, ts_created, ts_updated) VALUES ($1,'i-1','simulator',$2,'BUY',$3,$4,"
            "'pending',1,1)",
            coid,
            SYMBOL,
            price,
            D("0.0005"),
        )
        await send(redis_url, approved("BUY", price, "0.0005", coid=coid, action="cancel"))

        async def answered() -> bool:
            return any(
                isinstance(m, OrderFailed | OrderCanceled) and m.client_order_id == coid
                for m in await executions(redis_url)
            )

        await wait_for(answered, what="cancel answered")
        msgs = [m for m in await executions(redis_url) if getattr(m, "client_order_id", "") == coid]
        assert [(type(m).__name__, getattr(m, "action", "")) for m in msgs] == [
            ("OrderFailed", "cancel")
        ]
        rows = await fetch(
            database_url, "SELECT status FROM orders WHERE client_order_id = $1", coid
        )
        assert [r["status"] for r in rows] == ["pending"]  # reconciliation decides later
    finally:
        await ex.stop()


async def test_reconciliation_fails_an_unknown_order_only_after_its_deadline(
    sim: Sim, redis_url: str, database_url: str
) -> None:
    # Two placements whose outcome was lost and that the venue never received: one sent
    # long ago, one just now (its request could still reach the venue in its recvWindow).
    settings = msgspec.structs.replace(
        exec_settings(redis_url, database_url, sim.url), recv_window_ms=60_000
    )
    price = tick_price(sim.last * D("0.9"))
    old, fresh = "gs-lost-old", "gs-lost-fresh"
    conn = await asyncpg.connect(database_url)
    try:
        for coid, ts in ((old, 1), (fresh, time.time_ns())):
            await conn.execute(
                "INSERT INTO orders (client_order_id, intent_id, venue, symbol, side, price,"
                " qty, status, ts_created, ts_updated) VALUES ($1,'i-1','simulator',$2,'BUY',"
                "$3,$4,$5,$6,$6)",
                coid,
                SYMBOL,
                price,
                D("0.0005"),
                LedgerStatus.UNKNOWN,
                ts,
            )
    finally:
        await conn.close()
    ex = await start_executor(settings)  # ready once the start's reconciliation is done
    try:
        rows = await fetch(database_url, "SELECT client_order_id, status FROM orders")
        assert {r["client_order_id"]: r["status"] for r in rows} == {
            old: LedgerStatus.FAILED,
            fresh: LedgerStatus.UNKNOWN,
        }
        failed = [m for m in await executions(redis_url) if isinstance(m, OrderFailed)]
        assert [(m.client_order_id, m.action) for m in failed] == [(old, "place")]
    finally:
        await ex.stop()
