"""One view of all exposure: an active risk replica and a standby, as real processes.

The standby judges nothing while the active one runs. When the active one is SIGKILLed,
the standby takes the role on lease expiry (a higher fencing token), rebuilds its state
from the ledger, and keeps counting the exposure the dead one approved.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from test_duplicate_fills import publish
from test_wiring import SYMBOL, intent, venue_url, verdicts

from gridstream.common.messages import OrderApproved, OrderRejected
from gridstream.common.streams import Kind, Service, heartbeat_key

__all__ = ["venue_url"]

TTL_MS = 1500


async def beats(redis_url: str) -> list[dict[str, object]]:
    r = aioredis.Redis.from_url(redis_url)
    try:
        raws = [await r.get(heartbeat_key(Service.RISK.value, rep)) for rep in ("0", "1", "2")]
    finally:
        await r.aclose()
    return [json.loads(raw) for raw in raws if raw]


async def wait_for(cond, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await cond():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.timeout(120)
async def test_standby_risk_takes_over_and_keeps_the_exposure_view(
    venue_url: str, redis_url: str, database_url: str, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GS_")}
    env.update(
        REDIS_URL=redis_url,
        DATABASE_URL=database_url,
        GS_SYMBOLS=SYMBOL,
        GS_VENUE_REST_URL=venue_url,
        GS_BLOCK_MS="50",
        GS_LEASE_TTL_MS=str(TTL_MS),
        GS_LOG_FORMAT="text",
    )
    procs = []
    logs = []
    try:
        for i in range(2):
            log = (tmp_path / f"risk-{i}.log").open("wb")
            logs.append(log)
            procs.append(
                await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "gridstream.risk", env=env, stdout=log, stderr=log
                )
            )

        async def active_and_standby() -> bool:
            roles = sorted(str(b.get("role")) for b in await beats(redis_url))
            return roles == ["active", "standby"]

        await wait_for(active_and_standby, 60, "an active and a standby")
        active = next(b for b in await beats(redis_url) if b["role"] == "active")
        near_limit = intent(1, "BUY", "50000", "0.004")  # 200 of 250
        await publish(redis_url, Kind.INTENTS, [near_limit])

        async def judged(n: int) -> bool:
            return len(await verdicts(redis_url)) >= n

        await wait_for(lambda: judged(1), 30, "the first verdict")
        os.kill(int(active["pid"]), signal.SIGKILL)  # type: ignore[call-overload]

        async def taken_over() -> bool:
            return any(
                b["role"] == "active" and b["pid"] != active["pid"] for b in await beats(redis_url)
            )

        await wait_for(taken_over, 60, "the standby taking over")
        new = next(
            b for b in await beats(redis_url) if b["role"] == "active" and b["pid"] != active["pid"]
        )
        assert int(new["fencing_token"]) > int(active["fencing_token"])  # type: ignore[call-overload]
        over = intent(2, "BUY", "50000", "0.002")  # 200 + 100 > 250: the dead one's approval counts
        await publish(redis_url, Kind.INTENTS, [over])
        await wait_for(lambda: judged(2), 30, "the second verdict")
        first, second = await verdicts(redis_url)
        assert isinstance(first, OrderApproved) and first.intent_id == near_limit.id
        assert isinstance(second, OrderRejected) and second.reason == "MAX_EXPOSURE"
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
