"""Executor against the real simulator (aiohttp, Binance protocol) with real Redis and Postgres."""

from __future__ import annotations

import asyncio
import gzip
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from decimal import Decimal
from itertools import count
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis

from gridstream.common import codec
from gridstream.common.binance.trading import TradingClient
from gridstream.common.bus import Producer
from gridstream.common.ledger import LedgerStatus
from gridstream.common.messages import (
    Actions,
    AnyMessage,
    IntentAction,
    OrderAccepted,
    OrderApproved,
    OrderCanceled,
    OrderFilled,
    Side,
)
from gridstream.common.runtime import Runtime
from gridstream.common.streams import Kind, Service, stream
from gridstream.core.portfolio import book_from_fills
from gridstream.executor.main import run
from gridstream.executor.settings import ExecutorSettings
from gridstream.executor.venue import BinanceVenue
from gridstream.simulator.server import SIM_KEY, Simulator, start
from gridstream.simulator.settings import SimSettings, default_data_dir

KEY, SECRET = "exec-test-key", "exec-test-secret"
SYMBOL = "BTCUSDT"
D = Decimal
_n = count(1)


def window_start() -> int:
    with gzip.open(default_data_dir() / f"{SYMBOL}-1m.csv.gz", "rt") as fh:
        fh.readline()
        return int(fh.readline().split(",")[0]) + 86_400_000


@dataclass
class Sim:
    sim: Simulator
    url: str

    @property
    def last(self) -> Decimal:
        return self.sim.engine.last_price[SYMBOL]


@pytest.fixture
async def sim() -> AsyncIterator[Sim]:
    """The simulator in this loop; no market client, so the replay clock stands still."""
    settings = SimSettings(
        host="127.0.0.1",
        port=0,
        symbols=(SYMBOL,),
        start_ms=window_start(),
        hours=1.0,
        speed=0.0,
        api_key=KEY,
        api_secret=SECRET,
        wait_for_clients=True,
        balances={"USDT": D(700)},
    )
    runner, url = await start(settings)
    try:
        yield Sim(runner.app[SIM_KEY], url)
    finally:
        await runner.cleanup()


def exec_settings(redis_url: str, database_url: str, url: str) -> ExecutorSettings:
    return ExecutorSettings(
        redis_url=redis_url,
        database_url=database_url,
        symbols=[SYMBOL],
        venue="simulator",
        venue_rest_url=url,
        venue_ws_url=url.replace("http", "ws", 1),
        api_key=KEY,
        api_secret=SECRET,
        block_ms=50,
        claim_interval_s=60,
        reconnect_delay_s=0.1,
        unknown_outcome_wait_s=0.05,
    )


class RecordingVenue(BinanceVenue):
    """The real Binance venue; before each placement it reads the ledger row (for the test)."""

    def __init__(self, database_url: str, **kw: Any) -> None:
        super().__init__(**kw)
        self.database_url = database_url
        self.rows_at_send: list[tuple[str, str] | None] = []

    async def place(self, **kw: Any) -> Any:
        conn = await asyncpg.connect(self.database_url)
        try:
            row = await conn.fetchrow(
                "SELECT client_order_id, status FROM orders WHERE client_order_id = $1",
                kw["client_order_id"],
            )
        finally:
            await conn.close()
        self.rows_at_send.append(None if row is None else (row[0], row[1]))
        return await super().place(**kw)


@dataclass
class Running:
    rt: Runtime
    task: asyncio.Task[None]
    venue: BinanceVenue | None

    async def stop(self) -> None:
        self.rt.request_stop()
        try:
            await asyncio.wait_for(self.task, 10)
        finally:
            await self.rt.close()


async def start_executor(settings: ExecutorSettings, venue: BinanceVenue | None = None) -> Running:
    rt = Runtime(Service.EXECUTOR, settings)
    task = asyncio.create_task(run(settings, rt, venue))
    await wait_for(lambda: _ready(rt, task), what="executor ready")
    return Running(rt, task, venue)


async def _ready(rt: Runtime, task: asyncio.Task[None]) -> bool:
    if task.done():
        task.result()
    return rt.ready


async def wait_for(
    cond: Callable[[], Awaitable[bool]], *, timeout: float = 60.0, what: str = ""
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await cond():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def approved(
    side: Side,
    price: Decimal,
    qty: str,
    coid: str | None = None,
    action: IntentAction = Actions.PLACE,
) -> OrderApproved:
    n = next(_n)
    return OrderApproved(
        id=f"verdict-{n}",
        ts_event=time.time_ns(),
        ts_init=time.time_ns(),
        intent_id=f"intent-{n}",
        action=action,  # type: ignore[arg-type]
        symbol=SYMBOL,
        client_order_id=coid or f"gs-test-{n}",
        side=side,
        price=price,
        qty=D(qty),
    )


async def send(redis_url: str, *msgs: OrderApproved) -> None:
    client = aioredis.Redis.from_url(redis_url)
    try:
        await Producer(client).publish([(stream(Kind.ORDERS, SYMBOL), m) for m in msgs])
    finally:
        await client.aclose()


async def executions(redis_url: str) -> list[AnyMessage]:
    client = aioredis.Redis.from_url(redis_url)
    try:
        entries = await client.xrange(stream(Kind.EXECUTIONS, SYMBOL))
    finally:
        await client.aclose()
    return [codec.decode(fields[codec.FIELD]) for _id, fields in entries]


async def fetch(database_url: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(database_url)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


def tick_price(p: Decimal) -> Decimal:
    return p.quantize(D("0.01"))


async def test_place_writes_row_first_and_duplicate_is_not_resent(
    sim: Sim, redis_url: str, database_url: str
) -> None:
    settings = exec_settings(redis_url, database_url, sim.url)
    venue = RecordingVenue(
        database_url,
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
            rows = await fetch(database_url, "SELECT status FROM orders")
            return [r["status"] for r in rows] == [LedgerStatus.ACCEPTED]

        await wait_for(accepted, what="order accepted")
        assert venue.rows_at_send == [(order.client_order_id, LedgerStatus.PENDING)]
        # The same approval again (at-least-once redelivery) and a second approval with the
        # same client order id: neither reaches the venue again.
        again = approved("BUY", order.price, "0.0005", coid=order.client_order_id)
        await send(redis_url, order, again)

        async def three_accepted() -> bool:
            msgs = [m for m in await executions(redis_url) if isinstance(m, OrderAccepted)]
            return len(msgs) >= 3

        await wait_for(three_accepted, what="accepted re-emitted")
        assert len(venue.rows_at_send) == 1
        venue_orders = [
            o for o in sim.sim.engine.orders.values() if o.client_order_id == order.client_order_id
        ]
        assert len(venue_orders) == 1
        accepted_msgs = [m for m in await executions(redis_url) if isinstance(m, OrderAccepted)]
        assert {m.id for m in accepted_msgs} == {accepted_msgs[0].id}
        assert accepted_msgs[0].venue_order_id == str(venue_orders[0].order_id)
        rows = await fetch(database_url, "SELECT * FROM orders")
        assert len(rows) == 1
        assert rows[0]["venue_order_id"] == str(venue_orders[0].order_id)

        # cancel it: the venue cancels, the ledger says canceled, OrderCanceled published
        await send(
            redis_url,
            approved(
                "BUY", order.price, "0.0005", coid=order.client_order_id, action=Actions.CANCEL
            ),
        )

        async def canceled() -> bool:
            return any(isinstance(m, OrderCanceled) for m in await executions(redis_url))

        await wait_for(canceled, what="order canceled")
        rows = await fetch(database_url, "SELECT status FROM orders")
        assert rows[0]["status"] == LedgerStatus.CANCELED
        assert not venue_orders[0].is_open
    finally:
        await ex.stop()


async def test_rejected_order_fails_and_fill_lands_once(
    sim: Sim, redis_url: str, database_url: str
) -> None:
    settings = exec_settings(redis_url, database_url, sim.url)
    ex = await start_executor(settings)
    try:
        # A price off the tick: the venue refuses with -1013 -> OrderFailed, row failed.
        bad = approved("BUY", tick_price(sim.last * D("0.9")) + D("0.001"), "0.0005")
        # A buy above the market crosses and fills at once; the fill comes via the user stream.
        crossing = approved("BUY", tick_price(sim.last * D("1.01")), "0.0005")
        await send(redis_url, bad, crossing)

        async def filled() -> bool:
            rows = await fetch(database_url, "SELECT * FROM fills")
            return len(rows) >= 1

        await wait_for(filled, what="fill recorded")
        failed = [m for m in await executions(redis_url) if m.__class__.__name__ == "OrderFailed"]
        assert len(failed) == 1
        assert failed[0].code == -1013  # type: ignore[attr-defined]
        rows = {r["client_order_id"]: r for r in await fetch(database_url, "SELECT * FROM orders")}
        assert rows[bad.client_order_id]["status"] == LedgerStatus.FAILED

        async def order_filled() -> bool:
            r = await fetch(
                database_url,
                "SELECT status FROM orders WHERE client_order_id = $1",
                crossing.client_order_id,
            )
            return r[0]["status"] == LedgerStatus.FILLED

        await wait_for(order_filled, what="order filled")
        sim_fills = [f for f in sim.sim.engine.fills if f.symbol == SYMBOL]
        assert len(sim_fills) == 1
        fills = await fetch(database_url, "SELECT * FROM fills")
        assert len(fills) == 1
        assert fills[0]["client_order_id"] == crossing.client_order_id
        assert fills[0]["qty"] == D("0.0005")
        assert fills[0]["venue"] == "simulator"
        # A reconciliation sees the same trade again via myTrades: nothing new.
        before = [m for m in await executions(redis_url) if isinstance(m, OrderFilled)]
        assert len(before) == 1
        assert before[0].trade_id == fills[0]["trade_id"]
        # its position, the kernel's portfolio of the recorded fills, is in its status
        held = book_from_fills(fills).qty(SYMBOL)
        assert ex.rt.status["positions"] == {SYMBOL: str(held)}
    finally:
        await ex.stop()
    # restart: reconciliation again at start; still exactly one fill and one OrderFilled
    ex2 = await start_executor(settings)
    try:
        assert len(await fetch(database_url, "SELECT * FROM fills")) == 1
        assert len([m for m in await executions(redis_url) if isinstance(m, OrderFilled)]) == 1
        assert ex2.rt.status["positions"] == {SYMBOL: str(held)}  # rebuilt from the ledger
    finally:
        await ex2.stop()


async def test_restart_reconciliation_inserts_fill_made_while_down(
    sim: Sim, redis_url: str, database_url: str
) -> None:
    settings = exec_settings(redis_url, database_url, sim.url)
    # The executor wrote its row, sent the order, and died before hearing back; the order
    # filled at the venue while it was down.
    price = tick_price(sim.last * D("1.01"))
    coid = "gs-crashed-1"
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "INSERT INTO orders (client_order_id, intent_id, venue, symbol, side, price, qty,"
            " status, ts_created, ts_updated) VALUES ($1,'i-1','simulator',$2,'BUY',$3,$4,"
            "$5,1,1)",
            coid,
            SYMBOL,
            price,
            D("0.0005"),
            LedgerStatus.PENDING,
        )
    finally:
        await conn.close()
    async with TradingClient(sim.url, KEY, SECRET) as client:
        await client.new_order(
            symbol=SYMBOL, side="BUY", price=price, qty=D("0.0005"), client_order_id=coid
        )
        # a foreign order on the same account must not enter our ledger
        await client.new_order(
            symbol=SYMBOL, side="BUY", price=price, qty=D("0.0002"), client_order_id="manual-1"
        )
    assert len(sim.sim.engine.fills) == 2

    ex = await start_executor(settings)
    try:
        fills = await fetch(database_url, "SELECT * FROM fills")
        assert [f["client_order_id"] for f in fills] == [coid]
        row = (await fetch(database_url, "SELECT * FROM orders WHERE client_order_id = $1", coid))[
            0
        ]
        assert row["status"] == LedgerStatus.FILLED
        assert row["filled_qty"] == D("0.0005")
        assert row["venue_order_id"] is not None
        published = [m for m in await executions(redis_url) if isinstance(m, OrderFilled)]
        assert [m.client_order_id for m in published] == [coid]
        assert published[0].trade_id == fills[0]["trade_id"]
    finally:
        await ex.stop()
