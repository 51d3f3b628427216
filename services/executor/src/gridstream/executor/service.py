"""The executor: approved orders -> venue requests; venue events -> ledger and executions.

Exactly-once rules, in order of the code below:

* place: the ``orders`` row (keyed by the deterministic client order id) is written
  BEFORE the request. A row that already has a venue outcome is never resent; a row
  left ``pending``/``unknown`` (crash or lost answer) is first looked up at the venue.
* An answer that may or may not have happened (:class:`UnknownOutcome`) is resolved by
  querying the order by client id, never by sending again blindly.
* Fills are inserted with ``ON CONFLICT (venue, symbol, trade_id) DO NOTHING`` and
  published only when the insert was new.
* Reconciliation (open orders + own trades since the last known fill) runs at start and
  after every user-stream reconnect, while new orders wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

import asyncpg
import msgspec

from gridstream.common import metrics
from gridstream.common.binance import trading as bt
from gridstream.common.bus import Delivery, Outgoing, Producer
from gridstream.common.ledger import LedgerStatus
from gridstream.common.messages import (
    AnyMessage,
    OrderAccepted,
    OrderApproved,
    OrderCanceled,
    OrderFailed,
    OrderFilled,
)
from gridstream.common.streams import Kind, stream
from gridstream.executor.venue import StreamConnected, StreamDisconnected, Venue

log = logging.getLogger("gridstream.executor")

TERMINAL = (LedgerStatus.FILLED, LedgerStatus.CANCELED, LedgerStatus.FAILED)
UNRESOLVED = (LedgerStatus.PENDING, LedgerStatus.UNKNOWN)


class OutcomeStillUnknown(RuntimeError):
    """The venue could not tell whether a request happened; the delivery is retried later."""


class Stopping(RuntimeError):
    """The service is stopping before the venue was reconciled; nothing was sent."""


def _out(msg: AnyMessage, symbol: str) -> Outgoing:
    return (stream(Kind.EXECUTIONS, symbol), msg)


class Executor:
    """Holds the venue, the Postgres pool and the producer; see the module doc for the rules."""

    def __init__(
        self,
        *,
        venue: Venue,
        pool: asyncpg.Pool,
        producer: Producer,
        symbols: Sequence[str],
        service: str = "executor",
        unknown_outcome_queries: int = 3,
        unknown_outcome_wait_s: float = 0.5,
        reconnect_delay_s: float = 1.0,
        stop_event: asyncio.Event | None = None,
    ) -> None:
        self.venue = venue
        self.pool = pool
        self.producer = producer
        self.symbols = [s.upper() for s in symbols]
        self.service = service
        self.unknown_outcome_queries = unknown_outcome_queries
        self.unknown_outcome_wait_s = unknown_outcome_wait_s
        self.reconnect_delay_s = reconnect_delay_s
        self.stop_event = stop_event or asyncio.Event()
        self.lock = asyncio.Lock()
        self.reconciled = asyncio.Event()
        self.reconciliations = 0

    @property
    def name(self) -> str:
        return self.venue.name

    # =========================================================================== bus handler
    async def handle(self, batch: Sequence[Delivery]) -> list[Outgoing]:
        """Handle risk verdicts: place/cancel approved orders; ignore rejections."""
        if not self.reconciled.is_set():
            await self._wait_reconciled()
        out: list[Outgoing] = []
        async with self.lock:
            for d in batch:
                msg = d.message
                if not isinstance(msg, OrderApproved):
                    continue  # OrderRejected: nothing to do
                if msg.action == "place":
                    out.extend(await self.place(msg))
                else:
                    out.extend(await self.cancel(msg))
        return out

    async def _wait_reconciled(self) -> None:
        waiters = [
            asyncio.create_task(self.reconciled.wait()),
            asyncio.create_task(self.stop_event.wait()),
        ]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()
        if not self.reconciled.is_set():
            raise Stopping("stopping before the venue was reconciled")

    # =========================================================================== place
    async def place(self, msg: OrderApproved) -> list[Outgoing]:
        now = time.time_ns()
        async with self.pool.acquire() as conn:
            inserted = await conn.fetchval(
                "INSERT INTO orders (client_order_id, intent_id, venue, symbol, side, price, qty,"
                " status, ts_created, ts_updated) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$9)"
                " ON CONFLICT (client_order_id) DO NOTHING RETURNING true",
                msg.client_order_id,
                msg.intent_id,
                self.name,
                msg.symbol,
                msg.side,
                msg.price,
                msg.qty,
                LedgerStatus.PENDING,
                now,
            )
            row = None if inserted else await self._order_row(conn, msg.client_order_id)
        if row is not None:
            if row["status"] not in UNRESOLVED:
                log.info("order %s already %s; not resent", msg.client_order_id, row["status"])
                return await self._outcome_of(row)
            # An earlier attempt's outcome is unknown: ask the venue before anything else.
            found = await self._lookup(msg.symbol, msg.client_order_id)
            if found is not None:
                return await self._record_placed(found)
            log.info("order %s unknown to the venue; sending it", msg.client_order_id)
        return await self._send_place(msg)

    async def _send_place(self, msg: OrderApproved) -> list[Outgoing]:
        metrics.ORDERS.labels(self.service, msg.symbol, "place").inc()
        try:
            order = await self.venue.place(
                symbol=msg.symbol,
                side=msg.side,
                price=msg.price,
                qty=msg.qty,
                client_order_id=msg.client_order_id,
            )
        except bt.RateLimitedError as exc:
            await bt.sleep_for_rate_limit(exc)
            raise
        except bt.UnknownOutcome as exc:
            log.warning("placing %s: outcome unknown (%s); querying", msg.client_order_id, exc)
            await self._set_status(msg.client_order_id, LedgerStatus.UNKNOWN, UNRESOLVED)
            found = await self._resolve_unknown(msg.symbol, msg.client_order_id)
            if found is None:
                raise OutcomeStillUnknown(
                    f"order {msg.client_order_id} not found after an unknown outcome"
                ) from exc
            return await self._record_placed(found)
        except (bt.RejectedError, bt.AuthError, bt.UnknownOrderError) as exc:
            log.warning("venue refused %s: %s", msg.client_order_id, exc)
            return await self._record_failed(msg.symbol, msg.client_order_id, "place", exc)
        return await self._record_placed(order)

    async def _record_placed(self, order: bt.VenueOrder) -> list[Outgoing]:
        now = time.time_ns()
        accepted = bt.order_accepted(order, venue=self.name, ts_init=now)
        status = bt.ledger_status(order.status)
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "UPDATE orders SET status = CASE WHEN status = ANY($3::text[]) THEN $2"
                " ELSE status END, venue_order_id = $4, ts_updated = $5"
                " WHERE client_order_id = $1",
                order.client_order_id,
                status,
                list(UNRESOLVED),
                order.venue_order_id,
                now,
            )
            await self._event(
                conn, accepted.id, order.client_order_id, "accepted", "", accepted.ts_event
            )
        out = [_out(accepted, order.symbol)]
        if status == LedgerStatus.CANCELED:
            out.extend(await self._record_canceled(order))
        return out

    async def _record_failed(
        self, symbol: str, client_order_id: str, action: str, exc: bt.BinanceError
    ) -> list[Outgoing]:
        now = time.time_ns()
        failed = bt.order_failed(
            symbol=symbol,
            client_order_id=client_order_id,
            action="place" if action == "place" else "cancel",
            error=exc,
            ts_event=now,
            ts_init=now,
        )
        async with self.pool.acquire() as conn, conn.transaction():
            if action == "place":
                await conn.execute(
                    "UPDATE orders SET status = $2, ts_updated = $3 WHERE client_order_id = $1"
                    " AND status = ANY($4::text[])",
                    client_order_id,
                    LedgerStatus.FAILED,
                    now,
                    list(UNRESOLVED),
                )
            await self._event(
                conn, failed.id, client_order_id, f"{action}_failed", f"{exc.code} {exc.msg}", now
            )
        return [_out(failed, symbol)]

    async def _outcome_of(self, row: asyncpg.Record) -> list[Outgoing]:
        """The message an already-decided order produced (re-emitted on a redelivery)."""
        now = time.time_ns()
        status = row["status"]
        symbol = row["symbol"]
        if status == LedgerStatus.FAILED:
            async with self.pool.acquire() as conn:
                detail = await conn.fetchval(
                    "SELECT detail FROM order_events WHERE client_order_id = $1"
                    " AND kind = 'place_failed' ORDER BY ts_event DESC LIMIT 1",
                    row["client_order_id"],
                )
            code_s, _, reason = str(detail or "0 failed").partition(" ")
            code = int(code_s) if code_s.lstrip("-").isdigit() else 0
            return await self._record_failed(
                symbol, row["client_order_id"], "place", bt.RejectedError(code, reason)
            )
        order = self._venue_order_from_row(row)
        if status == LedgerStatus.CANCELED:
            return [_out(bt.order_canceled(order, venue=self.name, ts_init=now), symbol)]
        return [_out(bt.order_accepted(order, venue=self.name, ts_init=now), symbol)]

    @staticmethod
    def _venue_order_from_row(row: asyncpg.Record) -> bt.VenueOrder:
        return bt.VenueOrder(
            symbol=row["symbol"],
            venue_order_id=row["venue_order_id"] or row["client_order_id"],
            client_order_id=row["client_order_id"],
            status=row["status"],
            side=row["side"],
            price=Decimal(row["price"]),
            qty=Decimal(row["qty"]),
            filled_qty=Decimal(row["filled_qty"]),
            time_ms=int(row["ts_updated"]) // 1_000_000,
        )

    # =========================================================================== cancel
    async def cancel(self, msg: OrderApproved) -> list[Outgoing]:
        async with self.pool.acquire() as conn:
            row = await self._order_row(conn, msg.client_order_id)
        if row is None:
            return await self._record_failed(
                msg.symbol,
                msg.client_order_id,
                "cancel",
                bt.UnknownOrderError(bt.CODE_CANCEL_REJECTED, "no such order in the ledger"),
            )
        if row["status"] == LedgerStatus.CANCELED:
            return await self._outcome_of(row)
        if row["status"] in (LedgerStatus.FILLED, LedgerStatus.FAILED):
            return await self._record_failed(
                msg.symbol,
                msg.client_order_id,
                "cancel",
                bt.UnknownOrderError(bt.CODE_CANCEL_REJECTED, f"order is {row['status']}"),
            )
        metrics.ORDERS.labels(self.service, msg.symbol, "cancel").inc()
        order: bt.VenueOrder | None
        try:
            order = await self.venue.cancel(symbol=msg.symbol, client_order_id=msg.client_order_id)
        except bt.UnknownOrderError:
            # -2011: the venue no longer has it open; learn what became of it.
            order = await self._lookup(msg.symbol, msg.client_order_id)
            if order is None:
                gone = self._venue_order_from_row(row)
                return await self._record_canceled(gone)
        except bt.RateLimitedError as exc:
            await bt.sleep_for_rate_limit(exc)
            raise
        except bt.UnknownOutcome as exc:
            order = await self._resolve_unknown(msg.symbol, msg.client_order_id)
            if order is None or order.is_open:
                raise OutcomeStillUnknown(f"cancel of {msg.client_order_id}: {exc}") from exc
        except (bt.RejectedError, bt.AuthError) as exc:
            return await self._record_failed(msg.symbol, msg.client_order_id, "cancel", exc)
        if order.status in bt.CLOSED_CANCELED_STATUSES:
            return await self._record_canceled(order)
        if order.status == "FILLED":
            await self._set_status(msg.client_order_id, LedgerStatus.FILLED, LedgerStatus.OPEN)
            return await self._record_failed(
                msg.symbol,
                msg.client_order_id,
                "cancel",
                bt.UnknownOrderError(bt.CODE_CANCEL_REJECTED, "order already filled"),
            )
        raise OutcomeStillUnknown(f"cancel of {msg.client_order_id}: still {order.status}")

    async def _record_canceled(self, order: bt.VenueOrder) -> list[Outgoing]:
        msg = bt.order_canceled(order, venue=self.name, ts_init=time.time_ns())
        new = await self._apply_canceled(msg)
        del new  # a redelivered cancel re-emits the same message id: consumers dedupe
        return [_out(msg, order.symbol)]

    # =========================================================================== queries
    async def _lookup(self, symbol: str, client_order_id: str) -> bt.VenueOrder | None:
        """The venue's view of an order by client id; ``None`` if it does not exist."""
        try:
            return await self.venue.get_order(symbol=symbol, client_order_id=client_order_id)
        except bt.UnknownOrderError:
            return None

    async def _resolve_unknown(self, symbol: str, client_order_id: str) -> bt.VenueOrder | None:
        """After an unknown outcome: query a few times (the venue may still be processing)."""
        for attempt in range(self.unknown_outcome_queries):
            try:
                found = await self._lookup(symbol, client_order_id)
            except (bt.UnknownOutcome, bt.DefiniteError) as exc:
                log.warning("query of %s failed: %s", client_order_id, exc)
                found = None
                if attempt == self.unknown_outcome_queries - 1:
                    raise OutcomeStillUnknown(str(exc)) from exc
            if found is not None:
                return found
            await asyncio.sleep(self.unknown_outcome_wait_s)
        return None

    # =========================================================================== ledger
    @staticmethod
    async def _order_row(conn: asyncpg.Connection, client_order_id: str) -> asyncpg.Record | None:
        row: asyncpg.Record | None = await conn.fetchrow(
            "SELECT * FROM orders WHERE client_order_id = $1", client_order_id
        )
        return row

    async def _set_status(self, client_order_id: str, status: str, when: Sequence[str]) -> None:
        async with self.pool.acquire() as conn:
            await conn.execute(
                "UPDATE orders SET status = $2, ts_updated = $3 WHERE client_order_id = $1"
                " AND status = ANY($4::text[])",
                client_order_id,
                status,
                time.time_ns(),
                list(when),
            )

    @staticmethod
    async def _event(
        conn: asyncpg.Connection, event_id: str, coid: str, kind: str, detail: str, ts: int
    ) -> bool:
        new = await conn.fetchval(
            "INSERT INTO order_events (event_id, client_order_id, kind, detail, ts_event)"
            " VALUES ($1,$2,$3,$4,$5) ON CONFLICT (event_id) DO NOTHING RETURNING true",
            event_id,
            coid,
            kind,
            detail,
            ts,
        )
        return bool(new)

    async def record_fill(self, fill: OrderFilled) -> bool:
        """Insert one fill and update its order; True only when the fill was new."""
        now = time.time_ns()
        async with self.pool.acquire() as conn, conn.transaction():
            new = await conn.fetchval(
                "INSERT INTO fills (venue, symbol, trade_id, client_order_id, venue_order_id,"
                " side, price, qty, fee, fee_asset, liquidity, ts_event)"
                " VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12)"
                " ON CONFLICT (venue, symbol, trade_id) DO NOTHING RETURNING true",
                self.name,
                fill.symbol,
                fill.trade_id,
                fill.client_order_id,
                fill.venue_order_id,
                fill.side,
                fill.price,
                fill.qty,
                fill.fee,
                fill.fee_asset,
                fill.liquidity,
                fill.ts_event,
            )
            if not new:
                return False
            await conn.execute(
                "UPDATE orders SET filled_qty = filled_qty + $2,"
                " status = CASE WHEN status = $3 THEN status"
                "   WHEN filled_qty + $2 >= qty THEN $4 ELSE $5 END,"
                " venue_order_id = COALESCE(venue_order_id, $6), ts_updated = $7"
                " WHERE client_order_id = $1",
                fill.client_order_id,
                fill.qty,
                LedgerStatus.CANCELED,
                LedgerStatus.FILLED,
                LedgerStatus.PARTIALLY_FILLED,
                fill.venue_order_id,
                now,
            )
            await self._event(
                conn, fill.id, fill.client_order_id, "fill", fill.trade_id, fill.ts_event
            )
        metrics.FILLS.labels(self.service, fill.symbol).inc()
        return True

    async def _apply_accepted(self, msg: OrderAccepted) -> bool:
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "UPDATE orders SET status = CASE WHEN status = ANY($2::text[]) THEN $3"
                " ELSE status END, venue_order_id = COALESCE(venue_order_id, $4),"
                " ts_updated = $5 WHERE client_order_id = $1",
                msg.client_order_id,
                list(UNRESOLVED),
                LedgerStatus.ACCEPTED,
                msg.venue_order_id,
                time.time_ns(),
            )
            return await self._event(
                conn, msg.id, msg.client_order_id, "accepted", "", msg.ts_event
            )

    async def _apply_canceled(self, msg: OrderCanceled) -> bool:
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "UPDATE orders SET status = $2, ts_updated = $3 WHERE client_order_id = $1"
                " AND status = ANY($4::text[])",
                msg.client_order_id,
                LedgerStatus.CANCELED,
                time.time_ns(),
                list(LedgerStatus.OPEN),
            )
            return await self._event(
                conn, msg.id, msg.client_order_id, "canceled", str(msg.filled_qty), msg.ts_event
            )

    async def _apply_failed(self, msg: OrderFailed) -> bool:
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "UPDATE orders SET status = $2, ts_updated = $3 WHERE client_order_id = $1"
                " AND status = ANY($4::text[])",
                msg.client_order_id,
                LedgerStatus.FAILED,
                time.time_ns(),
                list(UNRESOLVED),
            )
            return await self._event(
                conn,
                msg.id,
                msg.client_order_id,
                "place_failed",
                f"{msg.code} {msg.reason}",
                msg.ts_event,
            )

    async def _is_ours(self, client_order_id: str) -> bool:
        async with self.pool.acquire() as conn:
            return bool(
                await conn.fetchval(
                    "SELECT true FROM orders WHERE client_order_id = $1", client_order_id
                )
            )

    # =========================================================================== user stream
    async def on_event(self, ev: bt.ExecutionMessage) -> list[Outgoing]:
        """Record one venue event; returns what to publish (only what was new)."""
        if not await self._is_ours(ev.client_order_id):
            log.info("ignoring %s for foreign order %s", type(ev).__name__, ev.client_order_id)
            return []
        if isinstance(ev, OrderFilled):
            new = await self.record_fill(ev)
        elif isinstance(ev, OrderAccepted):
            new = await self._apply_accepted(ev)
        elif isinstance(ev, OrderCanceled):
            new = await self._apply_canceled(ev)
        else:
            new = await self._apply_failed(ev)
        return [_out(ev, ev.symbol)] if new else []

    async def follow_events(self) -> None:
        """Consume the venue's event stream forever; reconcile on every (re)connect."""
        async for ev in self.venue.events():
            if isinstance(ev, StreamConnected):
                await self._reconcile_until_done()
            elif isinstance(ev, StreamDisconnected):
                self.reconciled.clear()
                log.warning("user stream lost; new orders wait for reconciliation")
            else:
                await self._publish(await self.on_event(ev))

    async def _publish(self, items: list[Outgoing]) -> None:
        if items:
            await self.producer.publish(items)

    async def _reconcile_until_done(self) -> None:
        while not self.stop_event.is_set():
            try:
                await self.reconcile()
                return
            except (bt.BinanceError, OutcomeStillUnknown, OSError) as exc:
                log.warning("reconciliation failed (%s); retrying", exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop_event.wait(), self.reconnect_delay_s)

    # =========================================================================== reconcile
    async def reconcile(self) -> int:
        """Bring the ledger in line with the venue; returns how many changes were published."""
        async with self.lock:
            published = 0
            for symbol in self.symbols:
                published += await self._reconcile_symbol(symbol)
            self.reconciliations += 1
            self.reconciled.set()
            log.info("reconciled with %s: %d change(s)", self.name, published)
            return published

    async def _reconcile_symbol(self, symbol: str) -> int:
        out: list[Outgoing] = []
        async with self.pool.acquire() as conn:
            last = await conn.fetchval(
                "SELECT MAX(trade_id::numeric) FROM fills WHERE venue = $1 AND symbol = $2"
                " AND trade_id ~ '^[0-9]+$'",
                self.name,
                symbol,
            )
        # 1. own trades since the last known fill
        for trade in await self.venue.trades_since(symbol, None if last is None else int(last)):
            coid = await self._client_id_of(symbol, trade.venue_order_id)
            if coid is None:
                continue  # not an order of ours
            fill = msgspec.structs.replace(trade, client_order_id=coid)
            if await self.record_fill(fill):
                out.append(_out(fill, symbol))
        # 2. open orders at the venue
        open_now = {o.client_order_id: o for o in await self.venue.open_orders(symbol)}
        now = time.time_ns()
        for o in open_now.values():
            if await self._is_ours(o.client_order_id):
                accepted = bt.order_accepted(o, venue=self.name, ts_init=now)
                if await self._apply_accepted(accepted):
                    out.append(_out(accepted, symbol))
        # 3. orders we think open that the venue no longer has open
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT * FROM orders WHERE venue = $1 AND symbol = $2"
                " AND status = ANY($3::text[])",
                self.name,
                symbol,
                list(LedgerStatus.OPEN),
            )
        for row in rows:
            coid = row["client_order_id"]
            if coid in open_now:
                continue
            found = await self._lookup(symbol, coid)
            if found is None:
                if row["status"] in UNRESOLVED:
                    out.extend(
                        await self._record_failed(
                            symbol,
                            coid,
                            "place",
                            bt.UnknownOrderError(
                                bt.CODE_NO_SUCH_ORDER, "order never reached the venue"
                            ),
                        )
                    )
                continue
            if found.is_open:
                accepted = bt.order_accepted(found, venue=self.name, ts_init=now)
                if await self._apply_accepted(accepted):
                    out.append(_out(accepted, symbol))
            elif found.status in bt.CLOSED_CANCELED_STATUSES:
                msg = bt.order_canceled(found, venue=self.name, ts_init=now)
                if await self._apply_canceled(msg):
                    out.append(_out(msg, symbol))
            elif found.status == "FILLED":
                await self._set_status(coid, LedgerStatus.FILLED, LedgerStatus.OPEN)
            elif found.status == "REJECTED":
                out.extend(
                    await self._record_failed(
                        symbol, coid, "place", bt.RejectedError(0, "REJECTED")
                    )
                )
        await self._publish(out)
        return len(out)

    async def _client_id_of(self, symbol: str, venue_order_id: str) -> str | None:
        async with self.pool.acquire() as conn:
            coid: Any = await conn.fetchval(
                "SELECT client_order_id FROM orders WHERE venue = $1 AND symbol = $2"
                " AND venue_order_id = $3",
                self.name,
                symbol,
                venue_order_id,
            )
        if coid is not None:
            return str(coid)
        try:
            order = await self.venue.get_order(symbol=symbol, venue_order_id=venue_order_id)
        except bt.UnknownOrderError:
            return None
        return order.client_order_id if await self._is_ours(order.client_order_id) else None
