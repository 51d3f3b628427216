"""Risk wiring: filters from a real venue (the simulator), state from Postgres, Redis streams."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis

from gridstream.common import codec, metrics
from gridstream.common.bus import Producer
from gridstream.common.ledger import LedgerStatus
from gridstream.common.messages import (
    Actions,
    AnyMessage,
    IntentAction,
    OrderApproved,
    OrderIntent,
    OrderRejected,
)
from gridstream.common.runtime import Runtime
from gridstream.common.streams import Kind, Service, stream
from gridstream.risk.main import run
from gridstream.risk.settings import RiskSettings
from gridstream.simulator.server import start
from gridstream.simulator.settings import SimSettings

SYMBOL = "BTCUSDT"
D = Decimal


@pytest.fixture
async def venue_url() -> AsyncIterator[str]:
    runner, url = await start(
        SimSettings(host="127.0.0.1", port=0, symbols=(SYMBOL,), hours=1.0, speed=0.0)
    )
    try:
        yield url
    finally:
        await runner.cleanup()


def intent(
    n: int,
    side: str,
    price: str,
    qty: str,
    action: IntentAction = Actions.PLACE,
    coid: str | None = None,
) -> OrderIntent:
    return OrderIntent(
        id=f"intent-{n}",
        ts_event=time.time_ns(),
        ts_init=time.time_ns(),
        action=action,
        symbol=SYMBOL,
        client_order_id=coid or f"gs-{n}",  # type: ignore[arg-type]
        side=side,
        price=D(price),
        qty=D(qty),  # type: ignore[arg-type]
    )


async def verdicts(redis_url: str) -> list[AnyMessage]:
    client = aioredis.Redis.from_url(redis_url)
    try:
        entries = await client.xrange(stream(Kind.ORDERS, SYMBOL))
    finally:
        await client.aclose()
    return [codec.decode(f[codec.FIELD]) for _i, f in entries]


def rejections(reason: str) -> float:
    value = metrics.REJECTIONS.labels("risk", reason)._value.get()
    return float(value)


async def seed(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "INSERT INTO fills VALUES ('simulator',$1,'7','old-1','1','BUY',60000,0.002,0,"
            "'BTC','maker',1)",
            SYMBOL,
        )
        await conn.execute(
            "INSERT INTO orders (client_order_id, intent_id, venue, symbol, side, price, qty,"
            " status, ts_created, ts_updated) VALUES"
            " ('open-1','i','simulator',$1,'BUY',60000,0.001,$2,1,1)",
            SYMBOL,
            LedgerStatus.ACCEPTED,
        )
    finally:
        await conn.close()


async def test_risk_service_end_to_end(venue_url: str, redis_url: str, database_url: str) -> None:
    await seed(database_url)
    settings = RiskSettings(
        redis_url=redis_url,
        database_url=database_url,
        symbols=[SYMBOL],
        venue_rest_url=venue_url,
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
        before = rejections("MAX_EXPOSURE")
        # restored: position 0.002 BTC, open buy 0.001 @ 60000 (60 USDT)
        # at 50000: 100 held + 60 open + 50 = 210 <= 250 -> approved
        ok = intent(1, "BUY", "50000", "0.001")
        # then 100 + 110 + 50 = 260 > 250 -> MAX_EXPOSURE
        too_much = intent(2, "BUY", "50000", "0.001")
        sell = intent(3, "SELL", "80000", "0.003")  # holds only 0.002
        cancel = intent(4, "BUY", "60000", "0.001", action=Actions.CANCEL, coid="open-1")
        client = aioredis.Redis.from_url(redis_url)
        try:
            await Producer(client).publish(
                [(stream(Kind.INTENTS, SYMBOL), m) for m in (ok, too_much, sell, cancel, ok)]
            )
        finally:
            await client.aclose()
        deadline = time.monotonic() + 60
        while len(got := await verdicts(redis_url)) < 5:
            assert time.monotonic() < deadline, f"only {len(got)} verdicts"
            await asyncio.sleep(0.05)
        kinds: list[Any] = [(type(v).__name__, getattr(v, "reason", "")) for v in got]
        assert kinds == [
            ("OrderApproved", ""),
            ("OrderRejected", "MAX_EXPOSURE"),
            ("OrderRejected", "INSUFFICIENT_POSITION"),
            ("OrderApproved", ""),
            ("OrderApproved", ""),
        ]
        assert got[0].id == got[4].id  # same intent twice -> same verdict id
        assert isinstance(got[3], OrderApproved) and got[3].action == Actions.CANCEL
        assert isinstance(got[1], OrderRejected)
        assert rejections("MAX_EXPOSURE") == before + 1
    finally:
        rt.request_stop()
        await asyncio.wait_for(task, 10)
        await rt.close()
