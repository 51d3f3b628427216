"""A lockstep replay: the simulator waits at every barrier until the stack has handled
everything it published, so a replay through the running services is as deterministic
as a backtest (replay parity, docs/backtest.md).

The simulator, started with ``GS_SIM_LOCKSTEP=true``, waits before its first step, after
the trades of a minute that filled orders (before the minute's closes go out), and after
every minute's closes. At each barrier this driver waits until the stack is *settled*,
then resumes it. Settled means, all at once:

* the account's user data stream is connected (the executor, started last, is up), and
  the simulator answers no request and holds no unsent websocket frame;
* every symbol's ``candles`` stream holds as many candles as the simulator closed;
* the ledger holds every fill the simulator made, its outbox is empty, and each order's
  filled quantity and open/closed state are the simulator's;
* no consumer group of any gridstream stream (the archiver's aside: it batches) has an
  entry undelivered or unacknowledged, and no dead letter was written.

Each condition is caused by the one before it (a service acknowledges an entry only with
its outputs written), so together they say that nothing is still on its way.

``gridstream lockstep`` drives the replay of a running stack (``make run`` with
``GS_SIM_LOCKSTEP=true``) to the end of its window: exit status 0 when the window is
replayed, 1 with the reason when it cannot go on.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import aiohttp
import asyncpg
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gridstream.common import streams as S
from gridstream.common.bus import group_behind
from gridstream.common.ledger import LedgerStatus
from gridstream.common.settings import CommonSettings

from .run import DEFAULT_SIM_PORT, SIM_HOST

#: Simulator statuses of an order that still rests on the book.
VENUE_OPEN = frozenset({"NEW", "PARTIALLY_FILLED", "PENDING_NEW"})
#: Consumer groups the driver does not wait for (they batch, and nothing trades on them).
IGNORED_GROUPS = frozenset({S.Service.ARCHIVER.value})
POLL_S = 0.005


class LockstepError(RuntimeError):
    """The replay cannot go on (dead letters, a count past the simulator's, a timeout)."""


@dataclass
class Progress:
    #: Barriers resumed by this driver.
    barriers: int = 0
    #: The simulator's number of the last barrier resumed (a driver started mid-replay
    #: begins past 0).
    barrier: int = 0
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
        """Why the stack is not settled at the barrier ``st`` describes; None if it is.

        The checks are not one snapshot, so they run in the order things move (the
        simulator, the market data, the pipeline's streams upstream first, the ledger
        against the venue), and :meth:`settled` runs them between two readings of
        :meth:`version` that must agree.
        """
        if not st.get("user_clients"):
            # the executor (started after every other service) listens to the account
            return "no user data stream is connected to the simulator (is the executor up?)"
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
        async for key in r.scan_iter(match=S.pattern_all(), _type="stream"):
            name = _text(key)
            if S.kind_of(name) == S.DEAD_LETTER_KIND and await r.xlen(name):
                raise LockstepError(f"dead letters in {name}")
        # upstream first: a stage writes what it hands on to the next stream before it
        # acknowledges its input, so a stage seen drained leaves nothing unseen downstream
        for kind in S.Kind:
            for name in S.streams(kind, self.symbols):
                why = await self._drained(r, name)
                if why:
                    return why
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

    async def settled(
        self,
        http: aiohttp.ClientSession,
        r: aioredis.Redis,
        db: asyncpg.Connection,
        st: dict[str, Any],
    ) -> str | None:
        """:meth:`unsettled`, trusted only when nothing moved while it looked."""
        before = await self.version(r, db)
        why = await self.unsettled(http, r, db, st)
        if why:
            return why
        if await self.version(r, db) != before:
            return "the stack moved while it was looked at"
        return None

    async def version(self, r: aioredis.Redis, db: asyncpg.Connection) -> tuple[int, ...]:
        """What changes when anything in the stack does: the entries added to every
        stream, the ledger's rows and its newest order update."""
        added = 0
        for kind in S.Kind:
            for name in S.streams(kind, self.symbols):
                if await r.exists(name):
                    added += int((await r.xinfo_stream(name))["entries-added"])
        row = await db.fetchrow(
            "SELECT (SELECT count(*) FROM fills) AS fills,"
            " (SELECT count(*) FROM order_events) AS events,"
            " (SELECT count(*) FROM orders) AS orders,"
            " (SELECT COALESCE(max(ts_updated), 0) FROM orders) AS updated"
        )
        if row is None:
            raise LockstepError("the ledger gave no answer")
        return (added, *(int(row[k]) for k in ("fills", "events", "orders", "updated")))

    async def _drained(self, r: aioredis.Redis, name: str) -> str | None:
        """Why a consumer group of stream ``name`` has not handled all of it, or None."""
        if not await r.exists(name):
            return None
        newest = (await r.xinfo_stream(name))["last-generated-id"]
        for info in await r.xinfo_groups(name):
            group = _text(info["name"])
            if group not in IGNORED_GROUPS and group_behind(newest, info):
                return (
                    f"{name} group {group}: read to {_text(info['last-delivered-id'])} of"
                    f" {_text(newest)}, pending {info['pending']}"
                )
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
                    self.progress.barrier = int(st["barrier"])
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
            if st["paused"] and st["barrier"] > self.progress.barrier:
                why = await self.settled(http, r, db, st) or ""
                if not why:
                    return st
            elif st["done"] and not st["paused"]:
                why = await self.settled(http, r, db, st) or ""
                if not why:
                    return None
            else:
                why = not_at_a_barrier(st)
            await asyncio.sleep(POLL_S)
        raise LockstepError(
            f"not settled after {timeout_s:g}s at barrier {self.progress.barrier + 1}: {why}"
        )


def not_at_a_barrier(st: dict[str, Any]) -> str:
    """What a simulator whose replay waits at no new barrier is doing (its status ``st``)."""
    if not st.get("lockstep"):
        return "the simulator does not replay in lockstep (GS_SIM_LOCKSTEP)"
    if not st.get("started"):
        return "the simulator's replay has not started (it waits for a market-data client)"
    if st.get("replay_waiting"):
        return "the simulator's replay waits for a market-data client"
    return "the simulator's next barrier"


# -- the command ------------------------------------------------------------------------------

#: Seconds between two progress lines, by default.
PROGRESS_EVERY_S = 10.0


def utc(ms: int) -> str:
    """An epoch-ms replay time as ``2026-03-23 12:09:59 UTC``."""
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def default_sim_url(env: Mapping[str, str]) -> str:
    """``GS_VENUE_REST_URL``, else the simulator of ``gridstream run`` on ``GS_SIM_PORT``."""
    port = env.get("GS_SIM_PORT") or str(DEFAULT_SIM_PORT)
    return env.get("GS_VENUE_REST_URL") or f"http://{SIM_HOST}:{port}"


def default_symbols(env: Mapping[str, str]) -> str:
    return env.get("GS_SYMBOLS") or ",".join(CommonSettings().symbols)


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: must be a number of seconds > 0")
    return value


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``lockstep`` on the ``gridstream`` command's subparsers."""
    env = os.environ
    ls = sub.add_parser(
        "lockstep",
        help="drive a lockstep replay (GS_SIM_LOCKSTEP=true) of the running stack",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ls.add_argument(
        "--sim",
        default=default_sim_url(env),
        metavar="URL",
        help="the simulator (default $GS_VENUE_REST_URL, else http://127.0.0.1:$GS_SIM_PORT,"
        f" port {DEFAULT_SIM_PORT} unless set: %(default)s)",
    )
    ls.add_argument(
        "--symbols",
        default=default_symbols(env),
        metavar="A,B",
        help="the stack's symbols (default $GS_SYMBOLS: %(default)s)",
    )
    ls.add_argument(
        "--barrier-timeout",
        type=_positive,
        default=60.0,
        metavar="S",
        help="give up when the stack has not settled at a barrier after S seconds"
        " (default %(default)s)",
    )
    ls.add_argument(
        "--progress-every",
        type=_positive,
        default=PROGRESS_EVERY_S,
        metavar="S",
        help="seconds between progress lines (default %(default)s)",
    )
    ls.set_defaults(fn=cmd_lockstep)


def cmd_lockstep(args: argparse.Namespace) -> int:
    from .common import database_url, redis_url

    symbols = [x.strip().upper() for x in args.symbols.split(",") if x.strip()]
    if not symbols:
        print("gridstream lockstep: --symbols: at least one symbol", file=sys.stderr)
        return 2
    driver = Lockstep(args.sim, redis_url(), database_url(), symbols)
    try:
        asyncio.run(drive(driver, args.barrier_timeout, args.progress_every, print))
    except KeyboardInterrupt:
        print(f"gridstream lockstep: interrupted after barrier {driver.progress.barrier}")
        return 130
    except (
        LockstepError,
        aiohttp.ClientError,
        asyncpg.PostgresError,
        asyncpg.InterfaceError,
        RedisError,
        OSError,
        TimeoutError,
    ) as exc:
        reason = str(exc) or type(exc).__name__
        if not isinstance(exc, LockstepError):
            reason = f"{type(exc).__name__}: {reason}"
        if driver.progress.barriers:
            p = driver.progress
            reason += f" ({p.barriers} barrier(s) resumed, the last {p.barrier})"
        print(f"gridstream lockstep: {reason}", file=sys.stderr)
        return 1
    return 0


async def drive(
    driver: Lockstep,
    barrier_timeout_s: float,
    progress_every_s: float,
    say: Callable[[str], None],
) -> Progress:
    """Run ``driver`` to the end of the window, saying how far it is now and then and,
    at the end, what was replayed."""
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        try:
            st = await driver._sim(http, "/sim/status")
        except aiohttp.ClientResponseError as exc:
            raise LockstepError(
                f"{driver.sim_url} is no simulator ({exc.status} {exc.message})"
            ) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise LockstepError(f"no simulator answers at {driver.sim_url} ({exc})") from None
        if not st.get("lockstep"):
            raise LockstepError(
                f"the simulator at {driver.sim_url} does not replay in lockstep"
                " (start it with GS_SIM_LOCKSTEP=true)"
            )
        start, end = int(st["window_start_ms"]), int(st["window_end_ms"])
        say(
            f"lockstep replay of {driver.sim_url}: {utc(start)} to {utc(end)},"
            f" symbols {','.join(driver.symbols)}, now at barrier {st['barrier']}"
        )
        t0 = time.monotonic()
        task = asyncio.create_task(driver.run(barrier_timeout_s=barrier_timeout_s))
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=progress_every_s)
                if done:
                    break
                say(progress_line(driver.progress, start, end))
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        progress = task.result()
        st = await driver._sim(http, "/sim/status")
    candles = ", ".join(f"{s} {n}" for s, n in sorted(st["closed_candles"].items()))
    say(
        f"replayed {utc(start)} to {utc(end)} in {time.monotonic() - t0:.1f}s:"
        f" {progress.barriers} barriers, {st['fills']} fills, {st['orders']} orders"
        f" ({st['open_orders']} open), closed candles: {candles}"
    )
    return progress


def progress_line(p: Progress, start_ms: int, end_ms: int) -> str:
    if not p.barriers:
        return "waiting for the stack to settle at the first barrier"
    share = min(max(p.clock_ms + 1 - start_ms, 0) / max(end_ms - start_ms, 1), 1.0)
    return f"barrier {p.barrier}: {p.fills} fills, replay clock {utc(p.clock_ms)} ({share:.0%})"


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
