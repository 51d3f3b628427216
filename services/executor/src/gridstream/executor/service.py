"""The executor: approved orders -> venue requests; venue events -> ledger and executions.

Wiring, not decisions: an order's status is decided only by the kernel's state machine
(:mod:`gridstream.core.orders`). Every change goes through :meth:`Executor._transition`:
it loads the ``orders`` row locked (``FOR NO KEY UPDATE``) in the writing transaction,
turns it into an ``OrderState``, applies the event it learned (a venue answer, a stream
report, a reconciliation finding: ``orders.venue_report`` maps a venue order status to
its event) and writes the state the machine returns, with an ``UPDATE`` guarded on the
status it read. A refused event (late, repeated, illegal) writes nothing but is still
recorded in ``order_events``: the events are the truth, the status their projection. An
order's deadline (after which "order does not exist" means it never reached the venue)
is its row's ``ts_updated`` plus ``recvWindow``.

Exactly-once rules, in order of the code below:

* place: the ``orders`` row (keyed by the deterministic client order id) is written
  BEFORE the request. A row that already has a venue outcome is never resent; a row
  left ``pending``/``unknown`` (crash or lost answer) is first looked up at the venue.
* An answer that may or may not have happened (:class:`UnknownOutcome`) is resolved by
  querying the order by client id, never by sending again blindly.
* Fills are inserted with ``ON CONFLICT (venue, symbol, trade_id) DO NOTHING``.
* Outbox: what the executor learns from the venue outside a bus delivery (user-stream
  events, reconciliation) is written with ``published_at`` NULL and its encoded message
  (``payload``) in the same transaction as the ledger change, then published, then
  marked. Nothing is published that is not first in the ledger, and a crash between
  the two leaves the row to be published again (migration 0002).
* Answers to a bus delivery (accepted/canceled/failed for an approval) are not in the
  outbox: they are the handler's outputs, committed with the acknowledgement, and a
  redelivered approval re-emits them (:meth:`Executor._outcome_of`).
* Reconciliation (unpublished outbox rows, open orders, own trades since the last
  known fill *and* every trade of each order whose fills the ledger may lack, then the
  outbox again) runs at start, after every user-stream reconnect and after a malformed
  stream event, while new orders wait. A fill lost on the stream is found again
  whatever fills came after it. A failed publish is retried every ``outbox_retry_s``
  (:meth:`Executor.outbox_loop`).
* Crash-only: a ledger (Postgres) error while recording a stream event ends
  :meth:`Executor.follow_events`; the wiring then stops the process with a non-zero
  exit and the restart reconciles before it trades. A frame that does not parse is
  logged with its raw text, counted, and followed by a reconciliation.
* Handler errors that say "not now" (rate limit, venue unreachable, outcome still
  unknown, stopping) are :class:`~gridstream.common.bus.RetryLater`: the bus retries
  them with back-off and never dead-letters the approval. A definite venue refusal is
  an outcome (``OrderFailed``), not an exception.
* A crash after a publish and before its mark publishes the row again: the same message
  id and trade id, which risk and strategy drop as already seen.
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
from redis.exceptions import RedisError

from gridstream.common import codec, metrics
from gridstream.common.binance import trading as bt
from gridstream.common.bus import Delivery, Outgoing, Producer, RetryLater
from gridstream.common.ledger import SELECT_FILLS, LedgerStatus, OrderEventKind
from gridstream.common.messages import (
    Actions,
    AnyMessage,
    IntentAction,
    OrderAccepted,
    OrderApproved,
    OrderCanceled,
    OrderFailed,
    OrderFilled,
)
from gridstream.common.streams import Kind, stream
from gridstream.core import orders
from gridstream.core.portfolio import FillBook, book_from_fills
from gridstream.executor.venue import MalformedEvent, StreamConnected, StreamDisconnected, Venue

log = logging.getLogger("gridstream.executor")

#: Outbox rows published per round trip.
OUTBOX_PAGE = 500

#: Stream frames that could not be parsed (their event may be lost until reconciled).
MALFORMED_EVENTS = metrics.MALFORMED_EVENTS


class OutcomeStillUnknown(RetryLater):
    """The venue could not tell whether a request happened; the delivery is retried later."""


class Stopping(RetryLater):
    """The service is stopping, or lost the venue's events, before a request; nothing sent."""


class VenueBusy(RetryLater):
    """The venue asked us to slow down (rate limit) or could not be reached; retry later."""


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
        outbox_retry_s: float = 1.0,
        malformed_reconcile_s: float = 5.0,
        recv_window_ms: int = bt.DEFAULT_RECV_WINDOW_MS,
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
        self.outbox_retry_s = outbox_retry_s
        #: Least time between two reconciliations asked for by malformed stream events.
        self.malformed_reconcile_s = malformed_reconcile_s
        #: How long after its last send an order the venue does not know may still reach
        #: it: the request's ``recvWindow`` (Binance drops it after that).
        self.deadline_after_ns = recv_window_ms * 1_000_000
        self.stop_event = stop_event or asyncio.Event()
        self.lock = asyncio.Lock()
        self.reconciled = asyncio.Event()
        self.reconciliations = 0
        self._outbox_lock = asyncio.Lock()
        #: True while outbox rows may wait for a publish that failed.
        self.outbox_dirty = True
        #: A malformed stream event asked for a reconciliation not yet run.
        self.reconcile_wanted = False
        self.malformed_events = 0
        self._last_reconcile = float("-inf")
        #: The positions of this venue's recorded fills: the kernel's portfolio, rebuilt
        #: from the ledger by :meth:`load_positions` and moved by each new fill.
        self.book = FillBook()
        #: symbol -> base units held, as text (what the heartbeat shows).
        self.positions: dict[str, str] = {}

    @property
    def name(self) -> str:
        return self.venue.name

    async def load_positions(self) -> None:
        """Rebuild :attr:`book` from the ledger's fills of this venue's symbols."""
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(SELECT_FILLS, self.symbols)
        self.book = book_from_fills(r for r in rows if r["venue"] == self.name)
        self.positions.clear()
        for symbol in self.book.portfolio.positions:
            self.positions[symbol] = str(self.book.qty(symbol))

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
                if not self.reconciled.is_set():
                    # the user stream dropped or died while this batch was in hand
                    raise Stopping("venue events not followed; not sending")
                try:
                    if msg.action == Actions.PLACE:
                        out.extend(await self.place(msg))
                    else:
                        out.extend(await self.cancel(msg))
                except bt.RateLimitedError as exc:
                    raise VenueBusy(f"rate limited: {exc}") from exc
                except bt.UnknownOutcome as exc:
                    raise OutcomeStillUnknown(f"{msg.client_order_id}: {exc}") from exc
                except (bt.RejectedError, bt.UnknownOrderError, bt.AuthError):
                    raise  # a refusal that escaped a lookup: a fault of this entry
                except bt.DefiniteError as exc:
                    # not reachable (code 0) or clock out of sync: nothing was done
                    raise VenueBusy(f"venue unavailable: {exc}") from exc
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
        deadline = now + self.deadline_after_ns
        new = orders.submit(msg.client_order_id, msg.qty, ts_event=now, deadline_ns=deadline)
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
                new.status,
                now,
            )
            resend = None
            if not inserted:
                async with conn.transaction():
                    resend = await self._transition(
                        conn,
                        msg.client_order_id,
                        orders.Submitted(ts_event=now, deadline_ns=deadline),
                    )
            row = None if resend is None else await self._order_row(conn, msg.client_order_id)
        if resend is not None and row is not None:
            if not resend.applied:
                log.info("order %s %s", msg.client_order_id, resend.reason)
                return await self._outcome_of(row)
            # An earlier attempt's outcome is unknown: ask the venue before anything else.
            found = await self._lookup(msg.symbol, msg.client_order_id)
            if found is not None:
                return await self._record_placed(found)
            log.info("order %s unknown to the venue; sending it", msg.client_order_id)
        return await self._send_place(msg)

    async def _send_place(self, msg: OrderApproved) -> list[Outgoing]:
        metrics.ORDERS.labels(self.service, msg.symbol, Actions.PLACE).inc()
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
            await self._apply_event(
                msg.client_order_id, orders.SendUnknown(ts_event=time.time_ns())
            )
            found = await self._resolve_unknown(msg.symbol, msg.client_order_id)
            if found is None:
                raise OutcomeStillUnknown(
                    f"order {msg.client_order_id} not found after an unknown outcome"
                ) from exc
            return await self._record_placed(found)
        except (bt.RejectedError, bt.AuthError, bt.UnknownOrderError) as exc:
            log.warning("venue refused %s: %s", msg.client_order_id, exc)
            return await self._record_failed(msg.symbol, msg.client_order_id, Actions.PLACE, exc)
        return await self._record_placed(order)

    async def _record_placed(self, order: bt.VenueOrder) -> list[Outgoing]:
        now = time.time_ns()
        accepted = bt.order_accepted(order, venue=self.name, ts_init=now)
        report = orders.venue_report(
            order.status, ts_event=accepted.ts_event, venue_order_id=order.venue_order_id
        )
        async with self.pool.acquire() as conn, conn.transaction():
            if report is None:
                log.warning(
                    "order %s: venue status %s unknown", order.client_order_id, order.status
                )
            else:
                await self._transition(conn, order.client_order_id, report)
            await self._event(
                conn,
                accepted.id,
                order.client_order_id,
                OrderEventKind.ACCEPTED,
                "",
                accepted.ts_event,
            )
        out = [_out(accepted, order.symbol)]
        if isinstance(report, orders.Canceled):
            out.extend(await self._record_canceled(order))
        return out

    async def _record_failed(
        self,
        symbol: str,
        client_order_id: str,
        action: IntentAction,
        exc: bt.BinanceError,
        *,
        outbox: bool = False,
        when: orders.NotFound | None = None,
    ) -> list[Outgoing]:
        """Record a refusal; with ``outbox`` (outside a bus delivery) also queue its message.

        A placement's refusal fails the order (:class:`orders.Rejected`). ``when``: the
        event that fails it instead (a lookup that found nothing); nothing is recorded
        when the state machine does not fail the order on it (before its deadline).
        """
        now = time.time_ns()
        failed = bt.order_failed(
            symbol=symbol,
            client_order_id=client_order_id,
            action=action,
            error=exc,
            ts_event=now,
            ts_init=now,
        )
        async with self.pool.acquire() as conn, conn.transaction():
            if action == Actions.PLACE:
                event = when or orders.Rejected(ts_event=now, reason=f"{exc.code} {exc.msg}")
                t = await self._transition(conn, client_order_id, event)
                if when is not None and (t is None or not t.applied):
                    return []
            await self._event(
                conn,
                failed.id,
                client_order_id,
                OrderEventKind.failed(action),
                f"{exc.code} {exc.msg}",
                now,
                failed if outbox else None,
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
                    " AND kind = $2 ORDER BY ts_event DESC LIMIT 1",
                    row["client_order_id"],
                    OrderEventKind.PLACE_FAILED,
                )
            code_s, _, reason = str(detail or "0 failed").partition(" ")
            code = int(code_s) if code_s.lstrip("-").isdigit() else 0
            return await self._record_failed(
                symbol, row["client_order_id"], Actions.PLACE, bt.RejectedError(code, reason)
            )
        order = self._venue_order_from_row(row)
        if status == LedgerStatus.CANCELED:
            return [_out(bt.order_canceled(order, venue=self.name, ts_init=now), symbol)]
        if status == LedgerStatus.FILLED:
            # Its fills went (or go) out through the outbox; an OrderAccepted now would
            # re-open a closed order downstream.
            return []
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
                Actions.CANCEL,
                bt.UnknownOrderError(bt.CODE_CANCEL_REJECTED, "no such order in the ledger"),
            )
        request = orders.apply(self._state_of(row), orders.CancelRequested(ts_event=time.time_ns()))
        if request.verdict is orders.Verdict.DUPLICATE:  # already canceled
            return await self._outcome_of(row)
        if not request.applied:
            return await self._record_failed(
                msg.symbol,
                msg.client_order_id,
                Actions.CANCEL,
                bt.UnknownOrderError(bt.CODE_CANCEL_REJECTED, request.reason),
            )
        metrics.ORDERS.labels(self.service, msg.symbol, Actions.CANCEL).inc()
        order: bt.VenueOrder | None
        try:
            order = await self.venue.cancel(symbol=msg.symbol, client_order_id=msg.client_order_id)
        except bt.UnknownOrderError:
            # -2011: the venue no longer has it open; learn what became of it.
            order = await self._lookup(msg.symbol, msg.client_order_id)
            if order is None:
                gone = await self._apply_event(
                    msg.client_order_id, orders.CancelUnknownOrder(ts_event=time.time_ns())
                )
                if gone is not None and gone.applied:
                    return await self._record_canceled(self._venue_order_from_row(row))
                # Never seen by the venue, or not yet: it is not canceled. An unresolved
                # order stays so; reconciliation looks it up again.
                reason = "order unknown to the venue" if gone is None else gone.reason
                log.warning("cancel of %s: %s", msg.client_order_id, reason)
                return await self._record_failed(
                    msg.symbol,
                    msg.client_order_id,
                    Actions.CANCEL,
                    bt.UnknownOrderError(bt.CODE_CANCEL_REJECTED, reason),
                )
        except bt.RateLimitedError as exc:
            await bt.sleep_for_rate_limit(exc)
            raise
        except bt.UnknownOutcome as exc:
            order = await self._resolve_unknown(msg.symbol, msg.client_order_id)
            if order is None or order.is_open:
                raise OutcomeStillUnknown(f"cancel of {msg.client_order_id}: {exc}") from exc
        except (bt.RejectedError, bt.AuthError) as exc:
            return await self._record_failed(msg.symbol, msg.client_order_id, Actions.CANCEL, exc)
        report = orders.venue_report(
            order.status, ts_event=order.time_ms * 1_000_000, venue_order_id=order.venue_order_id
        )
        if isinstance(report, orders.Canceled):
            return await self._record_canceled(order)
        if isinstance(report, orders.ReportedFilled):
            await self._apply_event(msg.client_order_id, report)
            return await self._record_failed(
                msg.symbol,
                msg.client_order_id,
                Actions.CANCEL,
                bt.UnknownOrderError(bt.CODE_CANCEL_REJECTED, "order already filled"),
            )
        raise OutcomeStillUnknown(f"cancel of {msg.client_order_id}: still {order.status}")

    async def _record_canceled(self, order: bt.VenueOrder) -> list[Outgoing]:
        msg = bt.order_canceled(order, venue=self.name, ts_init=time.time_ns())
        # An answer to a bus delivery: published with the acknowledgement, not via the
        # outbox. A redelivered cancel re-emits the same message id: consumers dedupe.
        await self._apply_canceled(msg, outbox=False)
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

    def _state_of(self, row: asyncpg.Record) -> orders.OrderState:
        """An ``orders`` row as the state machine's state.

        The row keeps no notional (the average price is unknown here) and no trade ids
        (the ``fills`` table's unique key dedupes trades before the machine sees one).
        Its deadline is ``ts_updated`` + ``recvWindow``: an unresolved row's
        ``ts_updated`` is its last send or later, so the deadline is never early.
        """
        ts_updated = int(row["ts_updated"])
        return orders.OrderState(
            client_order_id=row["client_order_id"],
            qty=Decimal(row["qty"]),
            status=LedgerStatus(row["status"]),
            filled_qty=Decimal(row["filled_qty"]),
            filled_notional=None,
            venue_order_id=row["venue_order_id"] or "",
            deadline_ns=ts_updated + self.deadline_after_ns,
            ts_updated=ts_updated,
        )

    async def _transition(
        self, conn: asyncpg.Connection, client_order_id: str, event: orders.OrderEvent
    ) -> orders.Transition | None:
        """Apply one event to an order: the state machine decides, this writes it.

        Call inside a transaction: the row is locked while the machine decides, so a
        concurrent writer (the user stream beside a reconciliation) waits for this one,
        and the update is guarded on the status read. ``None``: no such order.
        """
        row = await conn.fetchrow(
            "SELECT * FROM orders WHERE client_order_id = $1 FOR NO KEY UPDATE", client_order_id
        )
        if row is None:
            return None
        t = orders.apply(self._state_of(row), event)
        if not t.applied:
            log.debug("order %s: %s %s (%s)", client_order_id, event.kind, t.verdict, t.reason)
        if t.changed:
            await conn.execute(
                "UPDATE orders SET status = $2, filled_qty = $3,"
                " venue_order_id = NULLIF($4, ''), ts_updated = $5"
                " WHERE client_order_id = $1 AND status = $6",
                client_order_id,
                t.state.status,
                t.state.filled_qty,
                t.state.venue_order_id,
                time.time_ns(),
                t.previous.status,
            )
        return t

    async def _apply_event(
        self, client_order_id: str, event: orders.OrderEvent
    ) -> orders.Transition | None:
        """:meth:`_transition` in a transaction of its own."""
        async with self.pool.acquire() as conn, conn.transaction():
            return await self._transition(conn, client_order_id, event)

    @staticmethod
    async def _event(
        conn: asyncpg.Connection,
        event_id: str,
        coid: str,
        kind: OrderEventKind,
        detail: str,
        ts: int,
        outbox: AnyMessage | None = None,
    ) -> bool:
        """Insert an order event once; ``outbox``: the message to publish with it, queued."""
        new = await conn.fetchval(
            "INSERT INTO order_events (event_id, client_order_id, kind, detail, ts_event,"
            " published_at, payload) VALUES ($1,$2,$3,$4,$5,"
            " CASE WHEN $6::bytea IS NULL THEN 0 END, $6)"
            " ON CONFLICT (event_id) DO NOTHING RETURNING true",
            event_id,
            coid,
            kind,
            detail,
            ts,
            None if outbox is None else codec.encode(outbox),
        )
        return bool(new)

    async def record_fill(self, fill: OrderFilled) -> bool:
        """Insert one fill (queued in the outbox) and update its order; True when new."""
        async with self.pool.acquire() as conn, conn.transaction():
            new = await conn.fetchval(
                "INSERT INTO fills (venue, symbol, trade_id, client_order_id, venue_order_id,"
                " side, price, qty, fee, fee_asset, liquidity, ts_event, published_at, payload)"
                " VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,NULL,$13)"
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
                codec.encode(fill),
            )
            if not new:
                return False
            await self._transition(
                conn,
                fill.client_order_id,
                orders.Fill(
                    ts_event=fill.ts_event,
                    qty=fill.qty,
                    price=fill.price,
                    trade_id=fill.trade_id,
                    venue_order_id=fill.venue_order_id,
                ),
            )
            await self._event(
                conn,
                fill.id,
                fill.client_order_id,
                OrderEventKind.FILL,
                fill.trade_id,
                fill.ts_event,
            )
        metrics.FILLS.labels(self.service, fill.symbol).inc()
        self.book.on_fill(fill)
        self.positions[fill.symbol] = str(self.book.qty(fill.symbol))
        return True

    async def _apply_accepted(self, msg: OrderAccepted) -> bool:
        async with self.pool.acquire() as conn, conn.transaction():
            await self._transition(
                conn,
                msg.client_order_id,
                orders.Accepted(ts_event=msg.ts_event, venue_order_id=msg.venue_order_id),
            )
            return await self._event(
                conn, msg.id, msg.client_order_id, OrderEventKind.ACCEPTED, "", msg.ts_event, msg
            )

    async def _apply_canceled(self, msg: OrderCanceled, *, outbox: bool = True) -> bool:
        async with self.pool.acquire() as conn, conn.transaction():
            await self._transition(
                conn,
                msg.client_order_id,
                orders.Canceled(ts_event=msg.ts_event, venue_order_id=msg.venue_order_id),
            )
            return await self._event(
                conn,
                msg.id,
                msg.client_order_id,
                OrderEventKind.CANCELED,
                str(msg.filled_qty),
                msg.ts_event,
                msg if outbox else None,
            )

    async def _apply_failed(self, msg: OrderFailed) -> bool:
        async with self.pool.acquire() as conn, conn.transaction():
            await self._transition(
                conn,
                msg.client_order_id,
                orders.Rejected(ts_event=msg.ts_event, reason=f"{msg.code} {msg.reason}"),
            )
            return await self._event(
                conn,
                msg.id,
                msg.client_order_id,
                OrderEventKind.PLACE_FAILED,
                f"{msg.code} {msg.reason}",
                msg.ts_event,
                msg,
            )

    async def _is_ours(self, client_order_id: str) -> bool:
        async with self.pool.acquire() as conn:
            return bool(
                await conn.fetchval(
                    "SELECT true FROM orders WHERE client_order_id = $1", client_order_id
                )
            )

    # =========================================================================== user stream
    async def on_event(self, ev: bt.ExecutionMessage) -> bool:
        """Record one venue event in the ledger, its message in the outbox; True if new."""
        if not await self._is_ours(ev.client_order_id):
            log.info("ignoring %s for foreign order %s", type(ev).__name__, ev.client_order_id)
            return False
        if isinstance(ev, OrderFilled):
            return await self.record_fill(ev)
        if isinstance(ev, OrderAccepted):
            return await self._apply_accepted(ev)
        if isinstance(ev, OrderCanceled):
            return await self._apply_canceled(ev)
        return await self._apply_failed(ev)

    async def follow_events(self) -> None:
        """Consume the venue's event stream forever; reconcile on every (re)connect.

        A ledger error while recording an event ends this task (crash-only: the wiring
        stops the process and the restart reconciles). A frame that does not parse is
        logged and counted, and a reconciliation is asked for.
        """
        async for ev in self.venue.events():
            if isinstance(ev, StreamConnected):
                await self._reconcile_until_done()
            elif isinstance(ev, StreamDisconnected):
                self.reconciled.clear()
                log.warning("user stream lost; new orders wait for reconciliation")
            elif isinstance(ev, MalformedEvent):
                self.malformed_events += 1
                MALFORMED_EVENTS.labels(self.service, "user_stream").inc()
                log.error("malformed venue event (%s); reconciling. raw: %s", ev.error, ev.raw)
                self.reconcile_wanted = True
                await self._maybe_reconcile()
            elif await self.on_event(ev):
                await self.try_flush_outbox()

    async def _maybe_reconcile(self) -> None:
        """Reconcile if asked for and the last one is old enough (else the loop does it)."""
        if not self.reconcile_wanted or not self.reconciled.is_set():
            return  # a reconnect's reconciliation is due anyway
        if time.monotonic() - self._last_reconcile < self.malformed_reconcile_s:
            return
        await self._reconcile_until_done()

    # =========================================================================== outbox
    async def flush_outbox(self) -> int:
        """Publish every unpublished outbox row in ledger order, then mark them; a count.

        Raises when Redis or Postgres fails; the rows stay and are published next time.
        """
        async with self._outbox_lock:
            total = 0
            while True:
                async with self.pool.acquire() as conn:
                    rows = await conn.fetch(
                        "SELECT 'fills' AS tbl, seq, payload FROM fills"
                        " WHERE published_at IS NULL AND venue = $1"
                        " UNION ALL SELECT 'order_events', e.seq, e.payload"
                        " FROM order_events e JOIN orders o USING (client_order_id)"
                        " WHERE e.published_at IS NULL AND o.venue = $1"
                        " ORDER BY seq LIMIT $2",
                        self.name,
                        OUTBOX_PAGE,
                    )
                if not rows:
                    self.outbox_dirty = False
                    return total
                items: list[Outgoing] = []
                for row in rows:
                    msg = codec.decode(row["payload"])
                    items.append(_out(msg, getattr(msg, "symbol", "")))
                await self.producer.publish(items)
                now = time.time_ns()
                async with self.pool.acquire() as conn, conn.transaction():
                    for table in ("fills", "order_events"):
                        seqs = [r["seq"] for r in rows if r["tbl"] == table]
                        if seqs:
                            await conn.execute(
                                f"UPDATE {table} SET published_at = $1"  # table: one of two names
                                " WHERE seq = ANY($2::bigint[]) AND published_at IS NULL",
                                now,
                                seqs,
                            )
                total += len(rows)
                log.info("published %d execution event(s) from the outbox", len(rows))

    async def try_flush_outbox(self) -> int:
        """:meth:`flush_outbox`, logging a failure (the retry loop tries again)."""
        try:
            return await self.flush_outbox()
        except (RedisError, OSError, asyncpg.PostgresError) as exc:
            self.outbox_dirty = True
            log.warning("publishing execution events failed (%s); will retry", exc)
            return 0

    async def outbox_loop(self) -> None:
        """Retry failed outbox publishes every ``outbox_retry_s`` until stopped."""
        while not self.stop_event.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop_event.wait(), self.outbox_retry_s)
            if self.outbox_dirty and self.reconciled.is_set():
                await self.try_flush_outbox()
            await self._maybe_reconcile()

    async def _reconcile_until_done(self) -> None:
        while not self.stop_event.is_set():
            try:
                await self.reconcile()
                return
            except (
                bt.BinanceError,
                OutcomeStillUnknown,
                OSError,
                RedisError,
                asyncpg.PostgresError,
            ) as exc:
                log.warning("reconciliation failed (%s); retrying", exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop_event.wait(), self.reconnect_delay_s)

    # =========================================================================== reconcile
    async def reconcile(self) -> int:
        """Bring the ledger in line with the venue; returns how many changes were published."""
        async with self.lock:
            # what a crash (or a failed publish) left unpublished goes out first
            published = await self.flush_outbox()
            for symbol in self.symbols:
                await self._reconcile_symbol(symbol)
            published += await self.flush_outbox()
            self.reconciliations += 1
            self._last_reconcile = time.monotonic()
            self.reconcile_wanted = False
            self.reconciled.set()
            log.info("reconciled with %s: %d change(s)", self.name, published)
            return published

    async def _reconcile_symbol(self, symbol: str) -> None:
        """Write what the venue knows and the ledger lacks; messages go to the outbox.

        1. Ask the venue about orders: its open orders, and each order the ledger thinks
           open that the venue no longer has open (by client id); learn venue order ids.
        2. Fills: own trades after the last known fill (this finds trades of orders
           the ledger cannot map yet), then *every* trade of each order whose fills the
           ledger may lack (open, unresolved, filled below its quantity, or canceled
           below what the venue reported). A fill lost on the stream is found by the
           second pass whatever fills came after it. Fills are keyed by trade id, so
           nothing doubles.
        3. Statuses: accepted / canceled / failed / filled as the venue says.
        """
        now = time.time_ns()
        # 1. the venue's view of the orders
        open_now = {o.client_order_id: o for o in await self.venue.open_orders(symbol)}
        for o in open_now.values():
            await self._learn_venue_order_id(o.client_order_id, o.venue_order_id)
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT * FROM orders WHERE venue = $1 AND symbol = $2"
                " AND status = ANY($3::text[])",
                self.name,
                symbol,
                list(LedgerStatus.OPEN),
            )
        looked_up: list[tuple[asyncpg.Record, bt.VenueOrder | None]] = []
        for row in rows:
            coid = row["client_order_id"]
            if coid in open_now:
                continue
            found = await self._lookup(symbol, coid)
            if found is not None:
                await self._learn_venue_order_id(coid, found.venue_order_id)
            looked_up.append((row, found))
        # 2. fills
        async with self.pool.acquire() as conn:
            last = await conn.fetchval(
                "SELECT MAX(trade_id::numeric) FROM fills WHERE venue = $1 AND symbol = $2"
                " AND trade_id ~ '^[0-9]+$'",
                self.name,
                symbol,
            )
        for trade in await self.venue.trades_since(symbol, None if last is None else int(last)):
            mapped = await self._client_id_of(symbol, trade.venue_order_id)
            if mapped is None:
                continue  # not an order of ours
            await self.record_fill(msgspec.structs.replace(trade, client_order_id=mapped))
        for coid, venue_order_id in await self._orders_maybe_missing_fills(symbol):
            for trade in await self.venue.order_trades(symbol, venue_order_id):
                if await self.record_fill(msgspec.structs.replace(trade, client_order_id=coid)):
                    log.warning("reconciliation found a missed fill %s of %s", trade.trade_id, coid)
        # 3. statuses
        for o in open_now.values():
            if await self._is_ours(o.client_order_id):
                await self._apply_accepted(bt.order_accepted(o, venue=self.name, ts_init=now))
        for row, found in looked_up:
            coid = row["client_order_id"]
            if found is None:
                # failed if the order's deadline is past (the machine decides)
                await self._record_failed(
                    symbol,
                    coid,
                    Actions.PLACE,
                    bt.UnknownOrderError(bt.CODE_NO_SUCH_ORDER, "order never reached the venue"),
                    outbox=True,
                    when=orders.NotFound(ts_event=time.time_ns()),
                )
                continue
            report = orders.venue_report(
                found.status,
                ts_event=found.time_ms * 1_000_000,
                venue_order_id=found.venue_order_id,
            )
            if found.is_open:
                await self._apply_accepted(bt.order_accepted(found, venue=self.name, ts_init=now))
            elif isinstance(report, orders.Canceled):
                await self._apply_canceled(bt.order_canceled(found, venue=self.name, ts_init=now))
            elif isinstance(report, orders.ReportedFilled):
                await self._apply_event(coid, report)
            elif isinstance(report, orders.Rejected):
                await self._record_failed(
                    symbol, coid, Actions.PLACE, bt.RejectedError(0, "REJECTED"), outbox=True
                )

    async def _learn_venue_order_id(self, client_order_id: str, venue_order_id: str) -> None:
        async with self.pool.acquire() as conn:
            await conn.execute(
                "UPDATE orders SET venue_order_id = $2 WHERE client_order_id = $1"
                " AND venue_order_id IS NULL",
                client_order_id,
                venue_order_id,
            )

    async def _orders_maybe_missing_fills(self, symbol: str) -> list[tuple[str, str]]:
        """(client id, venue id) of orders whose fills the ledger may not hold in full."""
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT o.client_order_id, o.venue_order_id FROM orders o"
                " WHERE o.venue = $1 AND o.symbol = $2 AND o.venue_order_id IS NOT NULL"
                " AND (o.status = ANY($3::text[])"
                "  OR (o.status = $4 AND o.filled_qty < o.qty)"
                "  OR (o.status = $5 AND o.filled_qty < (SELECT MAX(CASE WHEN e.detail"
                "   ~ '^[0-9]+([.][0-9]+)?$' THEN e.detail::numeric END) FROM order_events e"
                "   WHERE e.client_order_id = o.client_order_id AND e.kind = $6)))"
                " ORDER BY o.ts_created",
                self.name,
                symbol,
                list(LedgerStatus.OPEN),
                LedgerStatus.FILLED,
                LedgerStatus.CANCELED,
                OrderEventKind.CANCELED,
            )
        return [(r["client_order_id"], r["venue_order_id"]) for r in rows]

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
