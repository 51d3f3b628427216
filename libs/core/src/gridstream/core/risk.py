"""The risk engine: pure, synchronous. Intents in, verdicts out; executions update state.

Checks for a ``place`` intent, in this order (first failure wins):

1. the symbol is known (``UNKNOWN_SYMBOL``);
2. price > 0, within min/max and on the tick (``PRICE_FILTER``);
3. quantity within min/max and on the step (``LOT_SIZE``);
4. price x qty >= min notional (``NOTIONAL``);
5. BUY: position value at the intent price + open buy notional + this order's notional
   <= ``max_exposure_quote`` (``MAX_EXPOSURE``);
6. SELL: qty <= position held minus what open sells already commit
   (``INSUFFICIENT_POSITION``).

A ``cancel`` is approved when the order is known (open), else rejected ``UNKNOWN_ORDER``.

Idempotent: the verdict for an intent id is remembered, so an intent seen twice
yields the very same verdict (same deterministic id) and counts exposure once.

Positions are the kernel's portfolio (:class:`~gridstream.core.portfolio.FillBook`): each
fill is applied once per (venue, symbol, trade id), and a fee paid in the base asset
reduces the position, as it does the account on Binance, so risk never approves a sell
of what the fees took.

Closed orders stay closed: the client order ids of orders that filled, were canceled
or failed (and of rejected places) are remembered (bounded), and an ``OrderAccepted``
for one of them is ignored. An accept can arrive after the order's fills (fills go out
through the executor's outbox at once, the handler's accept with its batch) or again
(a redelivered approval); it must not re-open the order. An accept for an order risk
does not know counts its quantity minus what fills already showed.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Final

from gridstream.common.binance.filters import SymbolFilters
from gridstream.common.messages import (
    Actions,
    OrderAccepted,
    OrderApproved,
    OrderCanceled,
    OrderFailed,
    OrderFilled,
    OrderIntent,
    OrderRejected,
    OrderType,
    OrderTypes,
    Side,
    deterministic_id,
)
from gridstream.core.portfolio import FillBook, assets_of

ZERO: Final = Decimal(0)
DEFAULT_MAX_EXPOSURE_QUOTE: Final = Decimal(250)
VERDICT_MEMORY: Final = 100_000
#: How many closed client order ids (and per-order filled quantities) are remembered.
CLOSED_MEMORY: Final = 100_000


class Closed:
    """Why a client order id is closed (values of :attr:`RiskEngine.closed`)."""

    FILLED: Final = "filled"
    CANCELED: Final = "canceled"
    FAILED: Final = "failed"
    REJECTED: Final = "rejected"  # risk refused the place: the executor never sent it
    LEDGER: Final = "ledger"  # terminal in the ledger at restore


class Reasons:
    """Stable rejection codes (filter codes match ``gridstream.common.binance.filters``)."""

    UNKNOWN_SYMBOL: Final = "UNKNOWN_SYMBOL"
    PRICE_FILTER: Final = "PRICE_FILTER"
    LOT_SIZE: Final = "LOT_SIZE"
    NOTIONAL: Final = "NOTIONAL"
    MAX_EXPOSURE: Final = "MAX_EXPOSURE"
    INSUFFICIENT_POSITION: Final = "INSUFFICIENT_POSITION"
    UNKNOWN_ORDER: Final = "UNKNOWN_ORDER"
    #: The venue path (executor) places limit orders only; market orders are backtest-only
    #: until it can place and reconcile them.
    ORDER_TYPE: Final = "ORDER_TYPE"


Verdict = OrderApproved | OrderRejected
Execution = OrderAccepted | OrderCanceled | OrderFilled | OrderFailed


@dataclass(slots=True)
class OpenOrder:
    """An order risk approved (or learned of) that may still rest on the book."""

    symbol: str
    side: Side
    price: Decimal
    remaining: Decimal

    @property
    def notional(self) -> Decimal:
        return self.price * self.remaining


def verdict_id(intent_id: str) -> str:
    """The id of risk's verdict on one intent (the same on every replay)."""
    return deterministic_id("risk", intent_id)


class RiskEngine:
    """Holds filters, positions and open orders; judges intents."""

    def __init__(
        self,
        filters: Mapping[str, SymbolFilters],
        *,
        max_exposure_quote: Decimal = DEFAULT_MAX_EXPOSURE_QUOTE,
        order_types: Iterable[OrderType] = (OrderTypes.LIMIT,),
    ) -> None:
        self.filters: dict[str, SymbolFilters] = dict(filters)
        self.max_exposure_quote = max_exposure_quote
        #: The order types the venue path behind this engine can place.
        self.order_types: frozenset[str] = frozenset(order_types)
        #: Positions: the kernel's portfolio, fed by fills (each trade once).
        self.book = FillBook(assets=self.assets)
        self.open_orders: dict[str, OpenOrder] = {}
        self._verdicts: OrderedDict[str, Verdict] = OrderedDict()
        #: client order id -> why it is closed (:class:`Closed`), oldest first, bounded.
        self.closed: OrderedDict[str, str] = OrderedDict()
        #: client order id -> quantity filled so far, for orders not (yet) known open.
        self._filled: OrderedDict[str, Decimal] = OrderedDict()

    @property
    def assets(self) -> dict[str, tuple[str, str]]:
        """symbol -> (base, quote), as the filters name them."""
        return assets_of(self.filters)

    @property
    def positions(self) -> dict[str, Decimal]:
        """Base units held per symbol (non-zero ones), from the book."""
        return {s: p.qty for s, p in self.book.portfolio.positions.items() if p.qty}

    # -- state restore ----------------------------------------------------------------------
    def restore(
        self,
        book: FillBook,
        open_orders: Mapping[str, OpenOrder],
        *,
        closed: Iterable[str] = (),
        verdicts: Iterable[Verdict] = (),
    ) -> None:
        """Load state rebuilt from the ledger: the book of its fills
        (:func:`~gridstream.core.portfolio.book_from_fills`, which also knows the fills
        already counted), open orders (placed or only approved), closed orders and earlier
        verdicts (oldest first)."""
        self.book = book
        self.open_orders = dict(open_orders)
        for coid in closed:
            if coid not in self.open_orders:
                self._close(coid, Closed.LEDGER)
        for verdict in verdicts:
            self._remember_verdict(verdict)

    def _close(self, client_order_id: str, why: str) -> None:
        self.closed[client_order_id] = why
        self.closed.move_to_end(client_order_id)
        if len(self.closed) > CLOSED_MEMORY:
            self.closed.popitem(last=False)
        self._filled.pop(client_order_id, None)

    def _remember_verdict(self, verdict: Verdict) -> None:
        self._verdicts[verdict.intent_id] = verdict
        if len(self._verdicts) > VERDICT_MEMORY:
            self._verdicts.popitem(last=False)

    # -- queries ----------------------------------------------------------------------------
    def position(self, symbol: str) -> Decimal:
        return self.book.qty(symbol)

    def open_notional(self, symbol: str, side: Side) -> Decimal:
        return sum(
            (
                o.notional
                for o in self.open_orders.values()
                if o.symbol == symbol and o.side == side
            ),
            ZERO,
        )

    def open_qty(self, symbol: str, side: Side) -> Decimal:
        return sum(
            (
                o.remaining
                for o in self.open_orders.values()
                if o.symbol == symbol and o.side == side
            ),
            ZERO,
        )

    def seen(self, intent_id: str) -> bool:
        """True when a verdict on this intent was already given."""
        return intent_id in self._verdicts

    # -- intents ----------------------------------------------------------------------------
    def on_intent(self, intent: OrderIntent, ts_init: int | None = None) -> Verdict:
        """Approve or reject one intent. The same intent id always gets the same verdict."""
        previous = self._verdicts.get(intent.id)
        if previous is not None:
            return previous
        ts = intent.ts_event if ts_init is None else ts_init
        if intent.action == Actions.CANCEL:
            verdict = self._judge_cancel(intent, ts)
        else:
            verdict = self._judge_place(intent, ts)
            coid = intent.client_order_id
            if (
                isinstance(verdict, OrderRejected)
                and coid not in self.open_orders
                and coid not in self.closed
            ):
                self._close(coid, Closed.REJECTED)
        self._remember_verdict(verdict)
        return verdict

    def _judge_cancel(self, intent: OrderIntent, ts: int) -> Verdict:
        if intent.client_order_id not in self.open_orders:
            return self._reject(
                intent, ts, Reasons.UNKNOWN_ORDER, f"no open order {intent.client_order_id}"
            )
        return self._approve(intent, ts)

    def _judge_place(self, intent: OrderIntent, ts: int) -> Verdict:
        if intent.order_type not in self.order_types:
            return self._reject(
                intent, ts, Reasons.ORDER_TYPE, f"{intent.order_type} orders are not supported"
            )
        f = self.filters.get(intent.symbol)
        if f is None:
            return self._reject(
                intent, ts, Reasons.UNKNOWN_SYMBOL, f"no filters for {intent.symbol}"
            )
        failure = f.check(intent.side, intent.price, intent.qty)
        if failure is not None:
            return self._reject(intent, ts, failure[0], failure[1])
        existing = self.open_orders.get(intent.client_order_id)
        if existing is not None:
            # Same client order id already counted: the executor will not place it twice.
            return self._approve(intent, ts)
        closed = self.closed.get(intent.client_order_id)
        if closed is not None and closed != Closed.REJECTED:
            # Already done at the venue: the executor answers with its outcome and sends
            # nothing, so there is no exposure to count.
            return self._approve(intent, ts)
        notional = intent.price * intent.qty
        if intent.side == "BUY":
            held_value = self.position(intent.symbol) * intent.price
            open_buys = self.open_notional(intent.symbol, "BUY")
            exposure = held_value + open_buys + notional
            if exposure > self.max_exposure_quote:
                return self._reject(
                    intent,
                    ts,
                    Reasons.MAX_EXPOSURE,
                    f"exposure {exposure} (position {held_value} + open buys {open_buys}"
                    f" + order {notional}) > {self.max_exposure_quote}",
                )
        else:
            available = self.position(intent.symbol) - self.open_qty(intent.symbol, "SELL")
            if intent.qty > available:
                return self._reject(
                    intent,
                    ts,
                    Reasons.INSUFFICIENT_POSITION,
                    f"sell {intent.qty} > available {available}",
                )
        self.open_orders[intent.client_order_id] = OpenOrder(
            intent.symbol, intent.side, intent.price, intent.qty
        )
        self.closed.pop(intent.client_order_id, None)
        return self._approve(intent, ts)

    @staticmethod
    def _approve(intent: OrderIntent, ts: int) -> OrderApproved:
        return OrderApproved(
            id=verdict_id(intent.id),
            ts_event=intent.ts_event,
            ts_init=ts,
            intent_id=intent.id,
            action=intent.action,
            symbol=intent.symbol,
            client_order_id=intent.client_order_id,
            side=intent.side,
            price=intent.price,
            qty=intent.qty,
        )

    @staticmethod
    def _reject(intent: OrderIntent, ts: int, reason: str, detail: str) -> OrderRejected:
        return OrderRejected(
            id=verdict_id(intent.id),
            ts_event=intent.ts_event,
            ts_init=ts,
            intent_id=intent.id,
            action=intent.action,
            symbol=intent.symbol,
            client_order_id=intent.client_order_id,
            reason=reason,
            detail=detail,
        )

    # -- executions -------------------------------------------------------------------------
    def on_execution(self, msg: Execution) -> None:
        """Apply one venue event from the executor (idempotent)."""
        if isinstance(msg, OrderFilled):
            self._on_fill(msg)
        elif isinstance(msg, OrderAccepted):
            self._on_accepted(msg)
        elif isinstance(msg, OrderCanceled):
            self.open_orders.pop(msg.client_order_id, None)
            self._close(msg.client_order_id, Closed.CANCELED)
        elif isinstance(msg, OrderFailed) and msg.action == Actions.PLACE:
            self.open_orders.pop(msg.client_order_id, None)
            self._close(msg.client_order_id, Closed.FAILED)

    def _on_accepted(self, msg: OrderAccepted) -> None:
        coid = msg.client_order_id
        order = self.open_orders.get(coid)
        if order is not None:
            order.price = msg.price
            return
        if coid in self.closed and self.closed[coid] != Closed.REJECTED:
            return  # late or repeated: the order is done, it must not count again
        remaining = msg.qty - self._filled.pop(coid, ZERO)
        if remaining <= 0:
            self._close(coid, Closed.FILLED)
            return
        self.closed.pop(coid, None)
        self.open_orders[coid] = OpenOrder(msg.symbol, msg.side, msg.price, remaining)

    def _on_fill(self, fill: OrderFilled) -> None:
        if not self.book.on_fill(fill):
            return
        coid = fill.client_order_id
        order = self.open_orders.get(coid)
        if order is not None:
            order.remaining -= fill.qty
            if order.remaining <= 0:
                del self.open_orders[coid]
                self._close(coid, Closed.FILLED)
        elif coid not in self.closed or self.closed[coid] == Closed.REJECTED:
            # Not known open (yet): keep what filled, for an accept that comes later.
            self._filled[coid] = self._filled.get(coid, ZERO) + fill.qty
            self._filled.move_to_end(coid)
            if len(self._filled) > CLOSED_MEMORY:
                self._filled.popitem(last=False)
