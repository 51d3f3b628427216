"""Risk's verdicts are durable: a restart still counts approvals the executor has not placed."""

from __future__ import annotations

import asyncio
import time

import asyncpg
from test_duplicate_fills import publish, running_risk
from test_wiring import intent, venue_url, verdicts

from gridstream.common.ledger import RiskVerdict
from gridstream.common.messages import AnyMessage, OrderApproved, OrderRejected
from gridstream.common.streams import Kind

__all__ = ["venue_url"]  # the simulator fixture, shared with test_wiring


async def verdict_for(redis_url: str, intent_id: str, n: int = 1) -> list[AnyMessage]:
    """The first ``n`` verdicts published for one intent (waits for them)."""
    deadline = time.monotonic() + 60
    while True:
        got = [v for v in await verdicts(redis_url) if v.intent_id == intent_id]  # type: ignore[union-attr]
        if len(got) >= n:
            return got
        assert time.monotonic() < deadline, f"no verdict for {intent_id}"
        await asyncio.sleep(0.05)


async def test_restart_counts_approvals_not_yet_placed(
    venue_url: str, redis_url: str, database_url: str
) -> None:
    near_limit = intent(1, "BUY", "50000", "0.004")  # 200 of 250
    async with running_risk(venue_url, redis_url, database_url):
        await publish(redis_url, Kind.INTENTS, [near_limit])
        [first] = await verdict_for(redis_url, near_limit.id)
        assert isinstance(first, OrderApproved)
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT intent_id, verdict, qty FROM risk_verdicts")
        assert [(r["intent_id"], r["verdict"]) for r in rows] == [
            (near_limit.id, RiskVerdict.APPROVED)
        ]
        assert await conn.fetch("SELECT * FROM orders") == []  # the executor has not placed it
    finally:
        await conn.close()
    # a new engine, rebuilt from the ledger
    async with running_risk(venue_url, redis_url, database_url):
        over = intent(2, "BUY", "50000", "0.002")  # 200 + 100 > 250
        await publish(redis_url, Kind.INTENTS, [over, near_limit])
        [v] = await verdict_for(redis_url, over.id)
        assert isinstance(v, OrderRejected) and v.reason == "MAX_EXPOSURE", v
        # the redelivered intent gets the very verdict it got before
        again = await verdict_for(redis_url, near_limit.id, 2)
        assert again[1] == first
