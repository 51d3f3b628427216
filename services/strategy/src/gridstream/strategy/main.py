"""Strategy service wiring: signals + risk verdicts + executions -> :class:`GridEngine` -> intents.

One consumer reads, for every configured symbol, ``stream(Kind.SIGNALS, sym)``,
``stream(Kind.ORDERS, sym)`` (risk's ``OrderApproved``/``OrderRejected``) and
``stream(Kind.EXECUTIONS, sym)``, and publishes intents to ``stream(Kind.INTENTS, sym)``.

At start the engine's live orders are rebuilt from the Postgres ``orders`` table (status
one of ``LedgerStatus.OPEN``) and its inventory, the kernel's portfolio, from ``fills``
(``SELECT_FILLS``; each (venue, symbol, trade id) remembered, so a fill re-read from the
stream is not counted twice).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Final

import asyncpg
import msgspec

from gridstream.common.binance.filters import SymbolFilters
from gridstream.common.binance.market import fetch_symbol_filters
from gridstream.common.bus import Delivery, Outgoing
from gridstream.common.ledger import SELECT_FILLS, LedgerStatus
from gridstream.common.messages import Signal
from gridstream.common.runtime import Runtime, load_or_exit, run_service
from gridstream.common.settings import CommonSettings
from gridstream.common.streams import Kind, Service, stream, streams
from gridstream.core.portfolio import assets_of
from gridstream.core.strategies.grid import GridEngine, GridParams, LiveOrder, parse_level, restore

log = logging.getLogger("gridstream.strategy")

#: Order statuses (``orders.status``) that mean the order may still rest on the book.
OPEN_STATUSES: Final = LedgerStatus.OPEN


def _parse_map(name: str, items: list[str]) -> dict[str, Decimal]:
    out: dict[str, Decimal] = {}
    for item in items:
        symbol, sep, value = item.partition(":")
        try:
            if not sep:
                raise ValueError(item)
            out[symbol.strip().upper()] = Decimal(value.strip())
        except (ArithmeticError, ValueError):
            raise ValueError(f"GS_{name.upper()}: expected SYMBOL:VALUE, got {item!r}") from None
    return out


#: The engine's defaults are the settings' defaults (one place to change them).
_DEFAULTS: Final = GridParams()


class StrategySettings(CommonSettings, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Settings of the strategy service (env ``GS_<FIELD>``).

    ``tick_sizes`` / ``step_sizes``: comma-separated ``SYMBOL:VALUE`` overrides of
    ``tick_size`` / ``qty_step`` (risk enforces the venue's filters in any case).
    """

    #: The signal interval that decides the grid.
    interval: str = "1m"
    #: Grid orders on each side of the centre.
    levels: int = _DEFAULTS.levels
    #: Level spacing in ATRs (the spacing is the largest of this, min_spacing_bps and fees).
    atr_mult: Decimal = _DEFAULTS.atr_mult
    #: Smallest level spacing, in basis points of the close.
    min_spacing_bps: Decimal = _DEFAULTS.min_spacing_bps
    #: Fee per fill in basis points: a round trip must clear twice this plus a tick.
    fee_bps: Decimal = _DEFAULTS.fee_bps
    #: Quote amount of each grid order (quantity = this / price, down to the step).
    order_quote: Decimal = _DEFAULTS.order_quote
    #: Price tick when the venue gives none for a symbol.
    tick_size: Decimal = _DEFAULTS.tick_size
    #: Quantity step when the venue gives none for a symbol.
    qty_step: Decimal = _DEFAULTS.qty_step
    #: A live order within this many spacings of a wanted level is kept, not replaced.
    cancel_tolerance: Decimal = _DEFAULTS.tolerance
    #: SYMBOL:VALUE,... tick size overrides.
    tick_sizes: list[str] = msgspec.field(default_factory=list)
    #: SYMBOL:VALUE,... quantity step overrides.
    step_sizes: list[str] = msgspec.field(default_factory=list)

    def __post_init__(self) -> None:
        super().__post_init__()
        try:
            self.params()
        except ValueError as exc:
            text = str(exc)
            if not text.startswith("GS_"):
                name = text.split(":", 1)[0].replace("tolerance", "cancel_tolerance")
                text = f"GS_{name.split('/')[0].upper()}: {text}"
            raise ValueError(text) from None

    def params(self, filters: Mapping[str, SymbolFilters] | None = None) -> GridParams:
        """Grid parameters; the venue's tick and step sizes unless a setting overrides them."""
        tick_sizes = {s: f.tick_size for s, f in (filters or {}).items() if f.tick_size > 0}
        step_sizes = {s: f.step_size for s, f in (filters or {}).items() if f.step_size > 0}
        tick_sizes.update(_parse_map("tick_sizes", self.tick_sizes))
        step_sizes.update(_parse_map("step_sizes", self.step_sizes))
        return GridParams(
            levels=self.levels,
            atr_mult=self.atr_mult,
            min_spacing_bps=self.min_spacing_bps,
            fee_bps=self.fee_bps,
            order_quote=self.order_quote,
            tick_size=self.tick_size,
            qty_step=self.qty_step,
            tolerance=self.cancel_tolerance,
            tick_sizes=tick_sizes,
            step_sizes=step_sizes,
        )


class StrategyService:
    """The engine plus its restart from the ledger and the bus handler."""

    def __init__(
        self, settings: StrategySettings, filters: Mapping[str, SymbolFilters] | None = None
    ) -> None:
        self.settings = settings
        self.engine = GridEngine(settings.params(filters), assets=assets_of(filters or {}))

    def input_streams(self) -> list[str]:
        s = self.settings.symbols
        return [
            *streams(Kind.SIGNALS, s),
            *streams(Kind.ORDERS, s),
            *streams(Kind.EXECUTIONS, s),
        ]

    def streams_of(self, symbol: str) -> list[str]:
        """The input streams of one symbol (what a replica reads once it holds it)."""
        return [
            stream(Kind.SIGNALS, symbol),
            stream(Kind.ORDERS, symbol),
            stream(Kind.EXECUTIONS, symbol),
        ]

    def forget(self, symbols: list[str]) -> None:
        for symbol in symbols:
            self.engine.forget(symbol)

    async def restore(
        self, pool: asyncpg.Pool, symbols: list[str] | None = None
    ) -> dict[str, object]:
        """Rebuild live orders and inventory from Postgres ``orders`` and ``fills``."""
        symbols = list(self.settings.symbols if symbols is None else symbols)
        self.forget(symbols)
        order_rows = await pool.fetch(
            "SELECT client_order_id, symbol, side, price, qty, filled_qty FROM orders"
            " WHERE symbol = ANY($1::text[]) AND status = ANY($2::text[])"
            " ORDER BY ts_created",
            symbols,
            list(OPEN_STATUSES),
        )
        fill_rows = await pool.fetch(SELECT_FILLS, symbols)
        orders = []
        for r in order_rows:
            parsed = parse_level(r["client_order_id"])
            orders.append(
                LiveOrder(
                    client_order_id=r["client_order_id"],
                    symbol=r["symbol"],
                    side=r["side"],
                    price=Decimal(r["price"]),
                    qty=Decimal(r["qty"]),
                    level=parsed[1] if parsed else 0,
                    filled=Decimal(r["filled_qty"]),
                    accepted=True,
                )
            )
        restore(self.engine, orders, fill_rows)
        summary: dict[str, object] = {
            "orders": len(orders),
            "fills": len(fill_rows),
            "inventory": {k: str(v) for k, v in self.engine.inventory.items() if k in symbols},
        }
        log.info("restored from the ledger: %s", summary)
        return summary

    async def handle(self, batch: Sequence[Delivery]) -> list[Outgoing]:
        """Every message of the batch, in the order the bus delivered it.

        Each signal of the strategy's interval decides the grid as it stands after every
        message before it, as ``gridstream backtest`` does candle by candle: the intents
        depend on the messages only, never on where a batch happened to end.
        """
        out: list[Outgoing] = []
        interval = self.settings.interval
        for d in batch:
            msg = d.message
            if isinstance(msg, Signal):
                if msg.interval != interval:
                    continue
                for intent in self.engine.on_signal(msg):
                    out.append((stream(Kind.INTENTS, intent.symbol), intent))
            else:
                self.engine.on_message(msg)
        return out


async def amain(settings: StrategySettings | None = None) -> None:
    settings = settings or load_or_exit(StrategySettings)
    rt = Runtime(Service.STRATEGY, settings)
    try:
        await rt.start(database=True)
        if rt.pool is None:
            raise RuntimeError("the strategy service needs Postgres to rebuild its state")
        filters = await fetch_symbol_filters(
            settings.venue_rest_url,
            settings.symbols,
            rt.stop_event,
            on_retry=lambda exc: log.warning("exchangeInfo not available (%s); retrying", exc),
        )
        service = StrategyService(settings, filters)
        pool = rt.pool
        restored: dict[str, object] = rt.status.setdefault("restored", {})

        async def acquire(symbols: list[str]) -> None:
            for symbol in symbols:
                restored[symbol] = await service.restore(pool, [symbol])

        async def release(symbols: list[str]) -> None:
            service.forget(symbols)
            for symbol in symbols:
                restored.pop(symbol, None)

        # Replicas split the symbols; each rebuilds a symbol from the ledger on taking it.
        await rt.consume_sharded(
            settings.symbols,
            service.streams_of,
            service.handle,
            on_acquire=acquire,
            on_release=release,
        )
    finally:
        await rt.close()


def main() -> None:
    run_service(amain)


if __name__ == "__main__":
    main()
