"""Risk wiring: filters from the venue, state from the ledger, intents -> verdicts."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from decimal import Decimal

import asyncpg

from gridstream.common import metrics
from gridstream.common.binance.filters import SymbolFilters
from gridstream.common.binance.market import fetch_symbol_filters
from gridstream.common.bus import Delivery, Handler, Outgoing
from gridstream.common.ledger import SELECT_FILLS, LedgerStatus, RiskVerdict
from gridstream.common.messages import (
    Actions,
    OrderAccepted,
    OrderApproved,
    OrderCanceled,
    OrderFailed,
    OrderFilled,
    OrderIntent,
    OrderRejected,
)
from gridstream.common.runtime import Runtime, load_or_exit, run_service
from gridstream.common.streams import Kind, Service, stream, streams
from gridstream.core.portfolio import book_from_fills
from gridstream.core.risk import (
    CLOSED_MEMORY,
    VERDICT_MEMORY,
    OpenOrder,
    RiskEngine,
    Verdict,
    verdict_id,
)
from gridstream.risk.settings import RiskSettings

log = logging.getLogger("gridstream.risk")
SERVICE = Service.RISK.value


async def fetch_filters(
    base_url: str, symbols: Sequence[str], stop: asyncio.Event, retry_s: float = 2.0
) -> dict[str, SymbolFilters]:
    """exchangeInfo for ``symbols`` from the venue, retrying until it answers (or stop)."""

    def on_retry(exc: Exception) -> None:
        metrics.RECONNECTS.labels(SERVICE, "venue").inc()
        log.warning("exchangeInfo not available (%s); retrying in %.1fs", exc, retry_s)

    filters = await fetch_symbol_filters(
        base_url, symbols, stop, retry_s=retry_s, on_retry=on_retry
    )
    missing = [s for s in symbols if s.upper() not in filters]
    if missing:
        log.warning("exchangeInfo lacks %s; intents for them will be rejected", missing)
    return filters


#: Ledger statuses after which an order can no longer fill.
TERMINAL = (LedgerStatus.FILLED, LedgerStatus.CANCELED, LedgerStatus.FAILED)


async def load_state(pool: asyncpg.Pool, engine: RiskEngine, symbols: Sequence[str]) -> None:
    """Rebuild risk's state out of the ledger.

    * positions: the kernel's portfolio rebuilt from the ledger's fills
      (:func:`~gridstream.core.portfolio.book_from_fills`; it remembers each trade, so a
      late publish counts once, and a fee in the base asset reduces the position);
    * open orders: every order the ledger has open, *and* every approved place whose
      order has no terminal state yet, including one the executor has not placed (no
      ``orders`` row): approvals still in ``gs:orders`` count, so a restart cannot
      approve past the limit;
    * closed client order ids (most recent first, bounded) and earlier verdicts.
    """
    syms = [s.upper() for s in symbols]
    async with pool.acquire() as conn:
        fill_rows = await conn.fetch(SELECT_FILLS, syms)
        approved_rows = await conn.fetch(
            "SELECT DISTINCT ON (v.client_order_id) v.client_order_id, v.symbol, v.side,"
            " v.price, v.qty - COALESCE(o.filled_qty, 0) AS remaining"
            " FROM risk_verdicts v LEFT JOIN orders o USING (client_order_id)"
            " WHERE v.symbol = ANY($1::text[]) AND v.verdict = $2 AND v.action = $4"
            " AND (o.status IS NULL OR NOT o.status = ANY($3::text[]))"
            " ORDER BY v.client_order_id, v.ts_init",
            syms,
            RiskVerdict.APPROVED,
            list(TERMINAL),
            Actions.PLACE,
        )
        order_rows = await conn.fetch(
            "SELECT client_order_id, symbol, side, price, qty - filled_qty AS remaining"
            " FROM orders WHERE symbol = ANY($1::text[]) AND status = ANY($2::text[])",
            syms,
            list(LedgerStatus.OPEN),
        )
        closed_rows = await conn.fetch(
            "SELECT client_order_id FROM orders WHERE symbol = ANY($1::text[])"
            " AND status = ANY($2::text[]) ORDER BY ts_updated DESC LIMIT $3",
            syms,
            list(TERMINAL),
            CLOSED_MEMORY,
        )
        verdict_rows = await conn.fetch(
            "SELECT * FROM risk_verdicts WHERE symbol = ANY($1::text[])"
            " ORDER BY ts_init DESC, intent_id LIMIT $2",
            syms,
            VERDICT_MEMORY,
        )
    book = book_from_fills(fill_rows, assets=engine.assets)
    open_orders = {
        r["client_order_id"]: OpenOrder(
            r["symbol"], r["side"], Decimal(r["price"]), Decimal(r["remaining"])
        )
        for r in (*approved_rows, *order_rows)  # the ledger's row wins over the verdict
        if Decimal(r["remaining"]) > 0
    }
    engine.restore(
        book,
        open_orders,
        closed=[r["client_order_id"] for r in reversed(closed_rows)],
        verdicts=[_verdict_of(r) for r in reversed(verdict_rows)],
    )
    log.info(
        "state restored: positions=%s open_orders=%d (approved, not yet placed: %d)",
        engine.positions,
        len(open_orders),
        len(
            {r["client_order_id"] for r in approved_rows}
            - {r["client_order_id"] for r in order_rows}
        ),
    )


def _verdict_of(row: asyncpg.Record) -> Verdict:
    """The verdict message a ``risk_verdicts`` row was written for (same id and fields)."""
    if row["verdict"] == RiskVerdict.APPROVED:
        return OrderApproved(
            id=verdict_id(row["intent_id"]),
            ts_event=row["ts_event"],
            ts_init=row["ts_init"],
            intent_id=row["intent_id"],
            action=row["action"],
            symbol=row["symbol"],
            client_order_id=row["client_order_id"],
            side=row["side"],
            price=Decimal(row["price"]),
            qty=Decimal(row["qty"]),
        )
    return OrderRejected(
        id=verdict_id(row["intent_id"]),
        ts_event=row["ts_event"],
        ts_init=row["ts_init"],
        intent_id=row["intent_id"],
        action=row["action"],
        symbol=row["symbol"],
        client_order_id=row["client_order_id"],
        reason=row["reason"],
        detail=row["detail"],
    )


_INSERT_VERDICTS = (
    "INSERT INTO risk_verdicts (intent_id, client_order_id, symbol, action, side, price, qty,"
    " verdict, reason, detail, ts_event, ts_init)"
    " SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],"
    " $6::numeric[], $7::numeric[], $8::text[], $9::text[], $10::text[], $11::bigint[],"
    " $12::bigint[])"
    " ON CONFLICT (intent_id) DO NOTHING"
)


async def save_verdicts(pool: asyncpg.Pool, judged: Sequence[tuple[OrderIntent, Verdict]]) -> None:
    """Write verdicts in one statement (one row per intent; a repeat changes nothing)."""
    if not judged:
        return
    cols: list[list[object]] = [[] for _ in range(12)]
    for intent, v in judged:
        rejected = isinstance(v, OrderRejected)
        row = (
            intent.id,
            intent.client_order_id,
            intent.symbol,
            intent.action,
            intent.side,
            intent.price,
            intent.qty,
            RiskVerdict.REJECTED if rejected else RiskVerdict.APPROVED,
            v.reason if isinstance(v, OrderRejected) else "",
            v.detail if isinstance(v, OrderRejected) else "",
            v.ts_event,
            v.ts_init,
        )
        for col, value in zip(cols, row, strict=True):
            col.append(value)
    async with pool.acquire() as conn:
        await conn.execute(_INSERT_VERDICTS, *cols)


def make_handler(engine: RiskEngine, pool: asyncpg.Pool) -> Handler:
    async def handle(batch: Sequence[Delivery]) -> list[Outgoing]:
        out: list[Outgoing] = []
        judged: list[tuple[OrderIntent, Verdict]] = []
        for d in batch:
            msg = d.message
            if isinstance(msg, OrderIntent):
                new = not engine.seen(msg.id)
                verdict = engine.on_intent(msg, ts_init=time.time_ns())
                if new and isinstance(verdict, OrderRejected):
                    metrics.REJECTIONS.labels(SERVICE, verdict.reason).inc()
                    log.info(
                        "rejected %s %s: %s %s",
                        verdict.symbol,
                        verdict.client_order_id,
                        verdict.reason,
                        verdict.detail,
                    )
                judged.append((msg, verdict))
                out.append((stream(Kind.ORDERS, msg.symbol), verdict))
            elif isinstance(msg, OrderAccepted | OrderCanceled | OrderFilled | OrderFailed):
                engine.on_execution(msg)
        # durable before published: a restart counts approvals not yet placed
        await save_verdicts(pool, judged)
        return out

    return handle


async def run(settings: RiskSettings, rt: Runtime) -> None:
    """Start the runtime, load filters and state, then judge intents until stopped."""
    await rt.start(database=True)
    # One view of all exposure: one active replica, the others standbys (fenced writes).
    if not await rt.become_active():
        return
    filters = await fetch_filters(
        settings.venue_rest_url, settings.symbols, rt.stop_event, settings.exchange_info_retry_s
    )
    engine = RiskEngine(filters, max_exposure_quote=settings.max_exposure_quote)
    assert rt.pool is not None
    await load_state(rt.pool, engine, settings.symbols)
    handle = make_handler(engine, rt.pool)
    await rt.consume(
        streams(Kind.INTENTS, settings.symbols) + streams(Kind.EXECUTIONS, settings.symbols),
        handle,
    )


async def amain() -> None:
    settings = load_or_exit(RiskSettings)
    rt = Runtime(Service.RISK, settings)
    try:
        await run(settings, rt)
    finally:
        await rt.close()


def main() -> None:
    run_service(amain)


if __name__ == "__main__":
    main()
