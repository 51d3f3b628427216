"""Risk counts a fill once, however often the executor publishes it.

The executor's outbox publishes a fill again when it crashed after the publish and
before marking it (same message id, same trade id), and publishes late a fill that was
already in the ledger when risk restored its state. Both must leave the position as if
the fill came once. The position is observed through risk's verdicts: a sell of more
than is held is rejected ``INSUFFICIENT_POSITION``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from decimal import Decimal

import asyncpg
import redis.asyncio as aioredis
from test_wiring import intent, venue_url, verdicts

from gridstream.common.binance.trading import fill_id
from gridstream.common.bus import Producer
from gridstream.common.messages import AnyMessage, OrderFilled
from gridstream.common.runtime import Runtime
from gridstream.common.streams import Kind, Service, group, stream
from gridstream.risk.main import run
from gridstream.risk.settings import RiskSettings

__all__ = ["venue_url"]  # the simulator fixture, shared with test_wiring

SYMBOL = "BTCUSDT"
VENUE = "simulator"
D = Decimal


def fill(trade_id: int, qty: str = "0.001", price: str = "50000") -> OrderFilled:
    """An ``OrderFilled`` exactly as the executor makes it (id derived from the trade)."""
    return OrderFilled(
        id=fill_id(VENUE, SYMBOL, trade_id),
        ts_event=1_700_000_000_000_000_000,
        ts_init=1_700_000_000_000_000_001,
        symbol=SYMBOL,
        client_order_id=f"gs-fill-{trade_id}",
        venue_order_id=str(900 + trade_id),
        trade_id=str(trade_id),
        side="BUY",
        price=D(price),
        qty=D(qty),
        fee=D(0),
        fee_asset="BNB",
        liquidity="taker",
        venue=VENUE,
    )


async def publish(redis_url: str, kind: Kind, msgs: Sequence[AnyMessage]) -> None:
    client = aioredis.Redis.from_url(redis_url)
    try:
        await Producer(client).publish([(stream(kind, SYMBOL), m) for m in msgs])
    finally:
        await client.aclose()


async def consumed(redis_url: str, kind: Kind) -> None:
    """Wait until risk has read and acknowledged everything on the stream."""
    client = aioredis.Redis.from_url(redis_url)
    name = stream(kind, SYMBOL)
    try:
        deadline = time.monotonic() + 60
        while True:
            info = {g["name"].decode(): g for g in await client.xinfo_groups(name)}
            g = info.get(group(Service.RISK))
            if g is not None and g["lag"] == 0 and g["pending"] == 0:
                return
            assert time.monotonic() < deadline, f"risk did not consume {name}: {g}"
            await asyncio.sleep(0.05)
    finally:
        await client.aclose()


@asynccontextmanager
async def running_risk(venue: str, redis_url: str, database_url: str) -> AsyncIterator[None]:
    settings = RiskSettings(
        redis_url=redis_url,
        database_url=database_url,
        symbols=[SYMBOL],
        venue_rest_url=venue,
        block_ms=50,
        claim_interval_s=60,
    )
    rt = Runtime(Service.RISK, settings)
    task = asyncio.create_task(run(settings, rt))
    try:
        deadline = time.monotonic() + 60
        while not rt.ready:
            assert time.monotonic() < deadline, "risk did not become ready"
            if task.done():
                task.result()
            await asyncio.sleep(0.05)
        yield
    finally:
        rt.request_stop()
        await asyncio.wait_for(task, 10)
        await rt.close()


async def sell_verdicts(redis_url: str, n0: int, *qtys: str) -> list[str]:
    """Send one sell intent per qty (in order); return each verdict's reason ('' = approved)."""
    msgs = [intent(n0 + i, "SELL", "80000", q) for i, q in enumerate(qtys)]
    await publish(redis_url, Kind.INTENTS, msgs)
    ids = {m.id for m in msgs}
    deadline = time.monotonic() + 60
    while True:
        got = [v for v in await verdicts(redis_url) if v.intent_id in ids]  # type: ignore[union-attr]
        if len(got) == len(msgs):
            return [getattr(v, "reason", "") for v in got]
        assert time.monotonic() < deadline, f"only {len(got)} verdicts"
        await asyncio.sleep(0.05)


async def test_the_same_fill_published_twice_counts_once(
    venue_url: str, redis_url: str, database_url: str
) -> None:
    async with running_risk(venue_url, redis_url, database_url):
        f = fill(42)
        # two stream entries, one message: the executor crashed between publish and mark
        await publish(redis_url, Kind.EXECUTIONS, [f, f])
        await consumed(redis_url, Kind.EXECUTIONS)
        # held: 0.001 BTC (0.002 if counted twice)
        assert await sell_verdicts(redis_url, 100, "0.0015", "0.001") == [
            "INSUFFICIENT_POSITION",
            "",
        ]


async def test_a_fill_already_in_the_ledger_published_late_counts_once(
    venue_url: str, redis_url: str, database_url: str
) -> None:
    f = fill(43)
    conn = await asyncpg.connect(database_url)
    try:
        # the executor wrote the fill and crashed before publishing it (outbox row)
        await conn.execute(
            "INSERT INTO fills (venue, symbol, trade_id, client_order_id, venue_order_id, side,"
            " price, qty, fee, fee_asset, liquidity, ts_event, published_at, payload)"
            " VALUES ($1,$2,$3,$4,$5,'BUY',$6,$7,0,'BNB','taker',1,NULL,'\\x00')",
            VENUE,
            SYMBOL,
            f.trade_id,
            f.client_order_id,
            f.venue_order_id,
            f.price,
            f.qty,
        )
    finally:
        await conn.close()
    async with running_risk(venue_url, redis_url, database_url):
        # risk restored the position from the ledger; now the outbox publishes it (twice)
        await publish(redis_url, Kind.EXECUTIONS, [f, f])
        await consumed(redis_url, Kind.EXECUTIONS)
        assert await sell_verdicts(redis_url, 200, "0.0015", "0.001") == [
            "INSUFFICIENT_POSITION",
            "",
        ]
