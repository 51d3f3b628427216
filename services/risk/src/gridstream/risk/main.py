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
from gridstream.common.binance.trading import fill_id
from gridstream.common.bus import Delivery, Handler, Outgoing
from gridstream.common.ledger import LedgerStatus
from gridstream.common.messages import (
    OrderAccepted,
    OrderCanceled,
    OrderFailed,
    OrderFilled,
    OrderIntent,
    OrderRejected,
)
from gridstream.common.runtime import Runtime, load_or_exit, run_service
from gridstream.common.streams import Kind, Service, stream, streams
from gridstream.risk.engine import OpenOrder, RiskEngine
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


async def load_state(pool: asyncpg.Pool, engine: RiskEngine, symbols: Sequence[str]) -> None:
    """Rebuild positions (from fills) and open orders (from orders) out of the ledger."""
    syms = [s.upper() for s in symbols]
    async with pool.acquire() as conn:
        pos_rows = await conn.fetch(
            "SELECT symbol, SUM(CASE WHEN side = 'BUY' THEN qty ELSE -qty END) AS pos"
            " FROM fills WHERE symbol = ANY($1::text[]) GROUP BY symbol",
            syms,
        )
        order_rows = await conn.fetch(
            "SELECT client_order_id, symbol, side, price, qty - filled_qty AS remaining"
            " FROM orders WHERE symbol = ANY($1::text[]) AND status = ANY($2::text[])",
            syms,
            list(LedgerStatus.OPEN),
        )
        fill_rows = await conn.fetch(
            "SELECT venue, symbol, trade_id FROM fills WHERE symbol = ANY($1::text[])", syms
        )
    positions = {r["symbol"]: Decimal(r["pos"]) for r in pos_rows}
    open_orders = {
        r["client_order_id"]: OpenOrder(
            r["symbol"], r["side"], Decimal(r["price"]), Decimal(r["remaining"])
        )
        for r in order_rows
        if Decimal(r["remaining"]) > 0
    }
    engine.restore(
        positions,
        open_orders,
        (fill_id(r["venue"], r["symbol"], r["trade_id"]) for r in fill_rows),
    )
    log.info("state restored: positions=%s open_orders=%d", positions, len(open_orders))


def make_handler(engine: RiskEngine) -> Handler:
    async def handle(batch: Sequence[Delivery]) -> list[Outgoing]:
        out: list[Outgoing] = []
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
                out.append((stream(Kind.ORDERS, msg.symbol), verdict))
            elif isinstance(msg, OrderAccepted | OrderCanceled | OrderFilled | OrderFailed):
                engine.on_execution(msg)
        return out

    return handle


async def run(settings: RiskSettings, rt: Runtime) -> None:
    """Start the runtime, load filters and state, then judge intents until stopped."""
    await rt.start(database=True)
    filters = await fetch_filters(
        settings.venue_rest_url, settings.symbols, rt.stop_event, settings.exchange_info_retry_s
    )
    engine = RiskEngine(filters, max_exposure_quote=settings.max_exposure_quote)
    assert rt.pool is not None
    await load_state(rt.pool, engine, settings.symbols)
    handle = make_handler(engine)
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
