"""A lockstep replay: the simulator waits at every barrier until the stack has handled
everything it published, so a replay through the running services is as deterministic
as a backtest (replay parity, docs/backtest.md).

The simulator, started with ``GS_SIM_LOCKSTEP=true``, waits before its first step, after
the trades of a minute that filled orders (before the minute's closes go out), and after
every minute's closes. At each barrier this driver waits until the stack is *settled*,
then resumes it. Settled means, all at once:

* the simulator answers no request and holds no unsent websocket frame;
* every symbol's ``candles`` stream holds as many candles as the simulator closed;
* the ledger holds every fill the simulator made, its outbox is empty, and each order's
  filled quantity and open/closed state are the simulator's;
* no consumer group of any gridstream stream (the archiver's aside: it batches) has an
  entry undelivered or unacknowledged, and no dead letter was written.

Each condition is caused by the one before it (a service acknowledges an entry only with
its outputs written), so together they say that nothing is still on its way.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import aiohttp
import asyncpg
import redis.asyncio as aioredis

from gridstream.common import streams as S
from gridstream.common.ledger import LedgerStatus

#: Simulator statuses of an order that still rests on the book.
VENUE_OPEN = frozenset({"NEW", "PARTIALLY_FILLED", "PENDING_NEW"})
#: Consumer groups the driver does not wait for (they batch, and nothing trades on them).
IGNORED_GROUPS = frozenset({S.Service.ARCHIVER.value})
POLL_S = 0.005


class LockstepError(RuntimeError):
    """The replay cannot go on (dead letters, a count past the simulator's, a timeout)."""


@dataclass
class Progress:
    barriers: int = 0
    fills: int = 0
    clock_ms: int = 0


class Lockstep:
    """Drives one lockstep replay of a simulator at ``sim_url``."""

    def __init__(
        self,
        sim_url: str,
        redis_url: str,
        database_url: str,
        symbols: list[str] | tuple[str, ...],
    ) -> None:
        self.sim_url = sim_url.rstrip("/")
        self.redis_url = redis_url
        self.database_url = database_url
        self.symbols = tuple(s.upper() for s in symbols)
        self.progress = Progress()

    # -- one look at everything -------------------------------------------------------------
    async def _sim(self, http: aiohttp.ClientSession, path: str) -> Any:
        async with http.get(f"{self.sim_url}{path}") as resp:
            resp.raise_for_status()
            return await resp.json()

    async def unsettled(
        self,
        http: aiohttp.ClientSession,
        r: aioredis.Redis,
        db: asyncpg.Connection,
        st: dict[str, Any],
    ) -> str | None:
        """Why the stack is not settled at the barrier ``st`` describes; None if it is."""
        if st["requests_in_flight"] or st["unsent_frames"]:
            return "simulator busy"
        for sym in self.symbols:
            key = S.stream(S.Kind.CANDLES, sym)
            added = 0
            if await r.exists(key):
                added = int((await r.xinfo_stream(key))["entries-added"])
            want = int(st["closed_candles"].get(sym, 0))
            if added > want:
                raise LockstepError(f"{key} holds {added} candles, the simulator closed {want}")
            if added < want:
                return f"{key}: {added} of {want} candles"
        fills = int(await db.fetchval("SELECT count(*) FROM fills"))
        if fills > st["fills"]:
            raise LockstepError(f"the ledger holds {fills} fills, the simulator made {st['fills']}")
        if fills < st["fills"]:
            return f"ledger: {fills} of {st['fills']} fills"
        waiting = await db.fetchval(
            "SELECT (SELECT count(*) FROM fills WHERE published_at IS NULL)"
            " + (SELECT count(*) FROM order_events WHERE published_at IS NULL)"
        )
        if waiting:
            return f"outbox: {waiting} rows"
        async for key in r.scan_iter(match=S.pattern_all(), _type="stream"):
            name = key.decode() if isinstance(key, bytes) else key
            if S.kind_of(name) == S.DEAD_LETTER_KIND:
                if await r.xlen(name):
                    raise LockstepError(f"dead letters in {name}")
                continue
            for info in await r.xinfo_groups(name):
                group = info["name"]
                group = group.decode() if isinstance(group, bytes) else group
                if group in IGNORED_GROUPS:
                    continue
                if (info.get("lag") or 0) > 0 or info["pending"] > 0:
                    return f"{name} group {group}: lag {info.get('lag')} pending {info['pending']}"
        venue = {o["clientOrderId"]: o for o in await self._sim(http, "/sim/orders")}
        rows = await db.fetch("SELECT client_order_id, status, filled_qty FROM orders")
        ledger = {row["client_order_id"]: row for row in rows}
        for coid, o in venue.items():
            row = ledger.get(coid)
            if row is None:
                return f"order {coid} not in the ledger"
            if Decimal(row["filled_qty"]) != Decimal(o["executedQty"]):
                return f"order {coid}: filled {row['filled_qty']}, venue {o['executedQty']}"
            if (row["status"] in LedgerStatus.OPEN) != (o["status"] in VENUE_OPEN):
                return f"order {coid}: {row['status']} in the ledger, {o['status']} at the venue"
        for coid, row in ledger.items():
            if coid not in venue and row["status"] not in (
                LedgerStatus.FAILED,
                LedgerStatus.CANCELED,
            ):
                return f"order {coid} is {row['status']} but the venue never had it"
        return None

    # -- the loop -----------------------------------------------------------------------------
    async def run(
        self,
        *,
        barrier_timeout_s: float = 60.0,
        check: Callable[[], None] | None = None,
    ) -> Progress:
        """Resume the simulator at every barrier once the stack is settled, until the
        window is replayed. ``check`` runs while waiting (e.g. to fail when a service died).
        """
        r = aioredis.Redis.from_url(self.redis_url)
        db = await asyncpg.connect(self.database_url)
        timeout = aiohttp.ClientTimeout(total=10)
        try:
            async with aiohttp.ClientSession(timeout=timeout) as http:
                while True:
                    st = await self._settled_barrier(http, r, db, barrier_timeout_s, check)
                    if st is None:
                        return self.progress
                    async with http.post(
                        f"{self.sim_url}/sim/resume", json={"barrier": st["barrier"]}
                    ) as resp:
                        if resp.status != 200:
                            raise LockstepError(f"resume refused: {await resp.text()}")
                    self.progress.barriers += 1
                    self.progress.fills = int(st["fills"])
                    self.progress.clock_ms = int(st["clock_ms"])
        finally:
            await db.close()
            await r.aclose()

    async def _settled_barrier(
        self,
        http: aiohttp.ClientSession,
        r: aioredis.Redis,
        db: asyncpg.Connection,
        timeout_s: float,
        check: Callable[[], None] | None,
    ) -> dict[str, Any] | None:
        """The next barrier, once the stack has settled at it; None when the replay is done
        and settled."""
        deadline = time.monotonic() + timeout_s
        why = "the simulator's next barrier"
        while time.monotonic() < deadline:
            if check is not None:
                check()
            st: dict[str, Any] = await self._sim(http, "/sim/status")
            if st["paused"] and st["barrier"] > self.progress.barriers:
                why = await self.unsettled(http, r, db, st) or ""
                if not why:
                    return st
            elif st["done"] and not st["paused"]:
                why = await self.unsettled(http, r, db, st) or ""
                if not why:
                    return None
            await asyncio.sleep(POLL_S)
        raise LockstepError(
            f"not settled after {timeout_s:.0f}s at barrier {self.progress.barriers + 1}: {why}"
        )
