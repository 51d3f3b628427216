"""Crash-only executor: a lost venue event never goes unnoticed, and is found again.

* A ledger error while recording a fill from the user stream stops a real executor
  process with a non-zero exit; the restart reconciles and the fill lands once.
* A stream frame that does not parse is logged and counted, the stream goes on, and a
  reconciliation finds the fill it carried.
* Reconciliation finds a fill the ledger lacks even when later fills are recorded.
"""

from __future__ import annotations

import asyncio
import os
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
from test_executor import (
    KEY,
    SECRET,
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

from gridstream.common import db
from gridstream.common.binance import trading as bt
from gridstream.common.ledger import LedgerStatus
from gridstream.common.messages import OrderFilled
from gridstream.executor.main import EXIT_TASK_DIED
from gridstream.executor.service import MALFORMED_EVENTS
from gridstream.executor.settings import ExecutorSettings
from gridstream.executor.venue import BinanceVenue

__all__ = ["sim"]  # the simulator fixture, shared with test_executor

D = Decimal


def process_env(settings: ExecutorSettings) -> dict[str, str]:
    """The environment a deployed executor would get for these settings."""
    return {
        **os.environ,
        "REDIS_URL": settings.redis_url,
        "DATABASE_URL": settings.database_url,
        "GS_SYMBOLS": ",".join(settings.symbols),
        "GS_VENUE": settings.venue,
        "GS_VENUE_REST_URL": settings.venue_rest_url,
        "GS_VENUE_WS_URL": settings.venue_ws_url,
        "GS_API_KEY": settings.api_key,
        "GS_API_SECRET": settings.api_secret,
        "GS_BLOCK_MS": str(settings.block_ms),
        "GS_RECONNECT_DELAY_S": str(settings.reconnect_delay_s),
        "GS_LOG_FORMAT": "text",
    }


async def fills_published(redis_url: str) -> list[OrderFilled]:
    return [m for m in await executions(redis_url) if isinstance(m, OrderFilled)]


async def sql(database_url: str, *statements: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


FAIL_FILL_INSERTS = (
    "CREATE FUNCTION fail_fill_insert() RETURNS trigger LANGUAGE plpgsql AS"
    " $$ BEGIN RAISE EXCEPTION 'fills unavailable (injected)'; END $$",
    "CREATE TRIGGER fail_fill_insert BEFORE INSERT ON fills"
    " FOR EACH ROW EXECUTE FUNCTION fail_fill_insert()",
)
HEAL_FILL_INSERTS = ("DROP TRIGGER fail_fill_insert ON fills",)


async def test_fill_write_failure_exits_nonzero_and_restart_records_it_once(
    sim: Sim, redis_url: str, database_url: str, tmp_path: Path
) -> None:
    settings = exec_settings(redis_url, database_url, sim.url)
    conn = await asyncpg.connect(database_url)
    try:
        await db.migrate(conn)
    finally:
        await conn.close()
    await sql(database_url, *FAIL_FILL_INSERTS)
    # A buy above the market: it fills at once; its fill comes over the user stream.
    order = approved("BUY", tick_price(sim.last * D("1.01")), "0.0005")
    await send(redis_url, order)
    log_path = tmp_path / "executor.log"
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gridstream.executor",
            env=process_env(settings),
            stdout=log,
            stderr=log,
        )
        try:
            rc = await asyncio.wait_for(proc.wait(), 30)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise AssertionError(
                f"executor kept running after losing a fill:\n{log_path.read_text()}"
            ) from None
    text = log_path.read_text()
    assert rc == EXIT_TASK_DIED, text
    assert "user-stream task ended" in text
    assert len(sim.sim.engine.fills) == 1  # the venue filled it
    assert await fetch(database_url, "SELECT * FROM fills") == []  # the ledger lost it
    assert await fills_published(redis_url) == []

    await sql(database_url, *HEAL_FILL_INSERTS)
    ex = await start_executor(settings)  # the restart reconciles before it trades
    try:
        fills = await fetch(database_url, "SELECT * FROM fills")
        assert [f["client_order_id"] for f in fills] == [order.client_order_id]
        published = await fills_published(redis_url)
        assert [(m.client_order_id, m.trade_id) for m in published] == [
            (order.client_order_id, fills[0]["trade_id"])
        ]
        rows = await fetch(
            database_url,
            "SELECT status, filled_qty FROM orders WHERE client_order_id = $1",
            order.client_order_id,
        )
        assert [(r["status"], r["filled_qty"]) for r in rows] == [
            (LedgerStatus.FILLED, D("0.0005"))
        ]
    finally:
        await ex.stop()


class BrokenTradeFrame(BinanceVenue):
    """The real venue, whose first TRADE frame arrives without its trade id."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.broken = 0

    def parse_event(self, payload: Any) -> bt.ExecutionMessage | None:
        event = dict(bt.unwrap_event(payload))
        if event.get("x") == "TRADE" and not self.broken:
            self.broken += 1
            del event["t"]
            return super().parse_event(event)  # KeyError, as from a malformed frame
        return super().parse_event(payload)


def malformed_count() -> float:
    return float(MALFORMED_EVENTS.labels("executor", "user_stream")._value.get())


async def test_malformed_frame_is_counted_stream_goes_on_and_fill_is_reconciled(
    sim: Sim, redis_url: str, database_url: str
) -> None:
    settings = msgspec.structs.replace(
        exec_settings(redis_url, database_url, sim.url), malformed_reconcile_s=0.0
    )
    venue = BrokenTradeFrame(
        name="simulator",
        rest_url=sim.url,
        ws_url=settings.venue_ws_url,
        api_key=KEY,
        api_secret=SECRET,
        reconnect_delay_s=0.1,
    )
    before = malformed_count()
    ex = await start_executor(settings, venue)
    try:
        first = approved("BUY", tick_price(sim.last * D("1.01")), "0.0005")
        await send(redis_url, first)

        async def one_published() -> bool:
            return len(await fills_published(redis_url)) >= 1

        await wait_for(one_published, what="the lost fill, found by reconciliation")
        assert venue.broken == 1
        assert malformed_count() == before + 1
        assert not ex.task.done()  # the stream and the service go on
        # the stream still delivers: a second fill arrives the normal way
        second = approved("BUY", tick_price(sim.last * D("1.01")), "0.0005")
        await send(redis_url, second)

        async def two_published() -> bool:
            return len(await fills_published(redis_url)) >= 2

        await wait_for(two_published, what="the next fill")

        async def all_marked() -> bool:
            rows = await fetch(database_url, "SELECT published_at FROM fills")
            return len(rows) == 2 and all(r["published_at"] is not None for r in rows)

        # every row marked published: nothing more will be sent for them
        await wait_for(all_marked, what="both outbox rows marked published")
        published = await fills_published(redis_url)
        assert [m.client_order_id for m in published] == [
            first.client_order_id,
            second.client_order_id,
        ]
        fills = await fetch(database_url, "SELECT client_order_id FROM fills ORDER BY seq")
        assert [f["client_order_id"] for f in fills] == [
            first.client_order_id,
            second.client_order_id,
        ]
    finally:
        await ex.stop()


async def test_reconciliation_finds_a_missed_fill_below_later_fills(
    sim: Sim, redis_url: str, database_url: str
) -> None:
    settings = exec_settings(redis_url, database_url, sim.url)
    ex = await start_executor(settings)
    a = approved("BUY", tick_price(sim.last * D("1.01")), "0.0005")
    b = approved("BUY", tick_price(sim.last * D("1.01")), "0.0004")
    try:
        await send(redis_url, a, b)

        async def both_filled() -> bool:
            rows = await fetch(database_url, "SELECT status FROM orders")
            fills = await fetch(database_url, "SELECT client_order_id FROM fills")
            # an order's status may say filled (the placement's answer) before its fill
            # row is written (from the trade): wait for both
            return (
                len(rows) == 2
                and all(r["status"] == LedgerStatus.FILLED for r in rows)
                and {f["client_order_id"] for f in fills} == {a.client_order_id, b.client_order_id}
            )

        await wait_for(both_filled, what="both orders filled, both fills recorded")
    finally:
        await ex.stop()
    trades = {
        r["client_order_id"]: int(r["trade_id"])
        for r in await fetch(database_url, "SELECT client_order_id, trade_id FROM fills")
    }
    assert trades[a.client_order_id] < trades[b.client_order_id]
    # The state a skipped stream event leaves: a's fill never recorded, b's (later) was.
    await sql(
        database_url,
        f"DELETE FROM fills WHERE client_order_id = '{a.client_order_id}'",
        f"UPDATE orders SET status = '{LedgerStatus.ACCEPTED}', filled_qty = 0"
        f" WHERE client_order_id = '{a.client_order_id}'",
    )
    ex = await start_executor(settings)
    try:
        rows = await fetch(
            database_url,
            "SELECT o.status, o.filled_qty, f.trade_id FROM orders o"
            " JOIN fills f USING (client_order_id) WHERE o.client_order_id = $1",
            a.client_order_id,
        )
        assert [(r["status"], r["filled_qty"], int(r["trade_id"])) for r in rows] == [
            (LedgerStatus.FILLED, D("0.0005"), trades[a.client_order_id])
        ]
        assert len(await fetch(database_url, "SELECT * FROM fills")) == 2
    finally:
        await ex.stop()
