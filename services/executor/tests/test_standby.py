"""One writer of orders: an active executor and a standby, as real processes.

The standby waits while the active one trades; when the active one is SIGKILLed, the
standby takes the role once its lease expires, with a higher fencing token, and trades
on. A session still carrying the old token has its ledger writes refused.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from decimal import Decimal
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as aioredis
from test_crash_only import process_env
from test_executor import Sim, approved, exec_settings, fetch, send, sim, tick_price, wait_for

from gridstream.common import db
from gridstream.common.ledger import LedgerStatus
from gridstream.common.streams import Service, heartbeat_key

__all__ = ["sim"]

D = Decimal
TTL_MS = 1500


async def roles(redis_url: str) -> dict[str, dict[str, object]]:
    """Replica id -> heartbeat body of every executor replica."""
    r = aioredis.Redis.from_url(redis_url)
    try:
        out = {}
        for rep in ("0", "1", "2"):
            raw = await r.get(heartbeat_key(Service.EXECUTOR.value, rep))
            if raw:
                out[rep] = json.loads(raw)
        return out
    finally:
        await r.aclose()


async def filled(database_url: str, coid: str) -> bool:
    rows = await fetch(database_url, "SELECT status FROM orders WHERE client_order_id = $1", coid)
    return bool(rows) and rows[0]["status"] == LedgerStatus.FILLED


@pytest.mark.timeout(120)
async def test_standby_takes_over_when_the_active_executor_dies(
    sim: Sim, redis_url: str, database_url: str, tmp_path: Path
) -> None:
    settings = exec_settings(redis_url, database_url, sim.url)
    env = {**process_env(settings), "GS_LEASE_TTL_MS": str(TTL_MS), "PYTHONUNBUFFERED": "1"}
    procs: list[asyncio.subprocess.Process] = []
    logs = []
    try:
        for i in range(2):
            log = (tmp_path / f"executor-{i}.log").open("wb")
            logs.append(log)
            procs.append(
                await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "gridstream.executor", env=env, stdout=log, stderr=log
                )
            )

        async def one_active_one_standby() -> bool:
            got = await roles(redis_url)
            return sorted(str(b.get("role")) for b in got.values()) == ["active", "standby"]

        await wait_for(one_active_one_standby, timeout=60, what="an active and a standby")
        before = await roles(redis_url)
        active = next(b for b in before.values() if b["role"] == "active")
        first = approved("BUY", tick_price(sim.last * D("1.01")), "0.0005")
        await send(redis_url, first)
        await wait_for(
            lambda: filled(database_url, first.client_order_id), timeout=30, what="fill 1"
        )
        old_token = int(active["fencing_token"])  # type: ignore[call-overload]
        os.kill(int(active["pid"]), signal.SIGKILL)  # type: ignore[call-overload]

        async def standby_active() -> bool:
            got = await roles(redis_url)
            return any(
                b.get("role") == "active" and b["pid"] != active["pid"] for b in got.values()
            )

        await wait_for(standby_active, timeout=60, what="the standby taking over")
        new = next(
            b
            for b in (await roles(redis_url)).values()
            if b["role"] == "active" and b["pid"] != active["pid"]  # not the dead one's beat
        )
        assert int(new["fencing_token"]) > old_token  # type: ignore[call-overload]
        second = approved("BUY", tick_price(sim.last * D("1.01")), "0.0004")
        await send(redis_url, second)
        await wait_for(
            lambda: filled(database_url, second.client_order_id), timeout=30, what="fill 2"
        )
        rows = await fetch(
            database_url, "SELECT token FROM service_fences WHERE service = $1", "executor"
        )
        assert [r["token"] for r in rows] == [new["fencing_token"]]
        # a session of the dead replica (its old token) cannot write the ledger any more
        conn = await asyncpg.connect(database_url)
        try:
            await conn.execute(
                "SELECT set_config($1, 'executor', false), set_config($2, $3, false)",
                db.FENCE_SERVICE_SETTING,
                db.FENCE_TOKEN_SETTING,
                str(old_token),
            )
            with pytest.raises(asyncpg.PostgresError) as refused:
                await conn.execute("UPDATE orders SET status = status")
            assert db.is_fenced_out(refused.value)
        finally:
            await conn.close()
    finally:
        for p in procs:
            if p.returncode is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                await asyncio.wait_for(p.wait(), 20)
            except TimeoutError:
                p.kill()
        for log in logs:
            log.close()
