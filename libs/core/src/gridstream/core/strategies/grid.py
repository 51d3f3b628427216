"""The grid engine: signals and order events in, order intents out. Pure and synchronous.

On each :class:`Signal` it computes the wanted grid, a symmetric ladder around the EMA:

* centre = EMA rounded to the tick; spacing = the largest of ``atr_mult`` x ATR,
  ``min_spacing_bps`` of the close, and ``2 x fee_bps`` of the close plus one tick (so a
  round trip always clears the fees), rounded *up* to a whole number of ticks;
* ``levels`` buys at ``centre - i x spacing`` and sells at ``centre + i x spacing``
  (i = 1..levels), each only if it rests on its side of the book (buys below the close,
  sells above), so grid orders are makers;
* quantity = ``order_quote / price`` rounded down to the step; sells, nearest first, only
  while their total stays within the base inventory the engine holds (from fills).

It then diffs the wanted grid with the orders it has live (placed by its own intents, or
adopted from ``OrderAccepted`` of a ``gs-`` id it did not know, e.g. after a restart): a live
order within ``tolerance x spacing`` of a wanted level of its side is kept; other live orders
get a ``cancel`` intent; wanted levels left unmatched get a ``place`` intent. Cancels come
first. ``high_volatility`` cancels every live order and places nothing; ``warmup`` does nothing.

Order state comes from events: ``OrderRejected`` (risk) and ``OrderFailed`` (venue) undo a
place or a cancel request, ``OrderCanceled`` and a fill reaching the order quantity end an
order, ``OrderFilled`` moves the inventory: the engine's :class:`FillBook` (the kernel's
portfolio, each trade counted once; a fee paid in the base asset reduces the position).
Ids are deterministic: processing the same signal twice returns the very same intents, so
a redelivered signal can never double an order.
"""

from __future__ import annotations

import functools
import re
import zlib
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import ROUND_CEILING, ROUND_FLOOR, ROUND_HALF_EVEN, Decimal
from typing import TYPE_CHECKING, Final

import numpy as np
import numpy.typing as npt

from gridstream.common.messages import (
    Actions,
    AnyMessage,
    IntentAction,
    OrderAccepted,
    OrderCanceled,
    OrderFailed,
    OrderFilled,
    OrderIntent,
    OrderRejected,
    Side,
    Signal,
    deterministic_id,
)
from gridstream.core.portfolio import QUOTE_ASSETS as QUOTE_ASSETS
from gridstream.core.portfolio import Assets, FillBook, FillRow
from gridstream.core.portfolio import base_asset as base_asset

if TYPE_CHECKING:
    from gridstream.core.signals.batch import SignalColumns
    from gridstream.core.strategies.grid_scan import GridPlan

#: Prefix of every client order id the grid strategy makes.
CLIENT_ID_PREFIX: Final = "gs-"
#: Binance's rule for client order ids.
CLIENT_ID_RE: Final = re.compile(r"^[a-zA-Z0-9-_]{1,36}$")
STRATEGY_NAME: Final = "grid"
_SIDE_CODE: Final[dict[str, str]] = {"BUY": "b", "SELL": "s"}
_CODE_SIDE: Final[dict[str, Side]] = {"b": "BUY", "s": "SELL"}
_BPS: Final = Decimal(10_000)
_MAX_SYMBOL_CODE: Final = 16
_RECENT: Final = 100_000


@functools.lru_cache(maxsize=256)
def to_base36(n: int) -> str:
    if n < 0:
        raise ValueError("base36 of a negative number")
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        n, r = divmod(n, 36)
        out = digits[r] + out
        if n == 0:
            return out


@functools.lru_cache(maxsize=4096)
def symbol_code(symbol: str) -> str:
    """The symbol itself when short and alphanumeric, else a prefix and a checksum."""
    if len(symbol) <= _MAX_SYMBOL_CODE and symbol.isalnum():
        return symbol
    clean = "".join(ch for ch in symbol if ch.isalnum())[:8]
    return f"{clean}{zlib.crc32(symbol.encode()):08x}"


def client_order_id(symbol: str, open_time: int, side: Side, level: int) -> str:
    """``gs-<symbol>-<signal open time, base36>-<b|s><level>``: at most 36 characters."""
    coid = (
        f"{CLIENT_ID_PREFIX}{symbol_code(symbol)}-{to_base36(open_time)}-{_SIDE_CODE[side]}{level}"
    )
    if not CLIENT_ID_RE.match(coid):
        raise ValueError(f"client order id out of Binance's format: {coid!r}")
    return coid


def parse_level(coid: str) -> tuple[Side, int] | None:
    """(side, level) of one of our client order ids, else None."""
    if not coid.startswith(CLIENT_ID_PREFIX):
        return None
    tail = coid.rsplit("-", 1)[-1]
    if len(tail) < 2 or tail[0] not in _CODE_SIDE or not tail[1:].isdigit():
        return None
    return _CODE_SIDE[tail[0]], int(tail[1:])


def round_to(value: Decimal, step: Decimal, rounding: str) -> Decimal:
    """``value`` as a whole number of ``step``s, rounded as asked."""
    return (value / step).to_integral_value(rounding=rounding) * step


@dataclass(frozen=True, slots=True)
class GridParams:
    levels: int = 3
    atr_mult: Decimal = Decimal("2")
    min_spacing_bps: Decimal = Decimal("25")
    fee_bps: Decimal = Decimal("10")
    order_quote: Decimal = Decimal("20")
    tick_size: Decimal = Decimal("0.01")
    qty_step: Decimal = Decimal("0.00001")
    tolerance: Decimal = Decimal("0.5")
    tick_sizes: Mapping[str, Decimal] = field(default_factory=dict)
    step_sizes: Mapping[str, Decimal] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.levels < 1:
            raise ValueError("levels: must be >= 1")
        for name in ("order_quote", "tick_size", "qty_step"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be > 0")
        for name in ("atr_mult", "min_spacing_bps", "fee_bps", "tolerance"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0")
        if any(v <= 0 for v in (*self.tick_sizes.values(), *self.step_sizes.values())):
            raise ValueError("tick_sizes/step_sizes: must be > 0")

    def tick(self, symbol: str) -> Decimal:
        return self.tick_sizes.get(symbol, self.tick_size)

    def step(self, symbol: str) -> Decimal:
        return self.step_sizes.get(symbol, self.qty_step)


@dataclass(frozen=True, slots=True)
class Level:
    """One wanted grid order."""

    side: Side
    level: int
    price: Decimal
    qty: Decimal


@dataclass(frozen=True, slots=True)
class Grid:
    centre: Decimal
    spacing: Decimal
    levels: tuple[Level, ...]


@dataclass(slots=True)
class LiveOrder:
    """An order the engine placed (or adopted) and believes is open or about to be."""

    client_order_id: str
    symbol: str
    side: Side
    price: Decimal
    qty: Decimal
    level: int = 0
    filled: Decimal = Decimal(0)
    accepted: bool = False
    cancel_pending: bool = False


class _Recent:
    """A bounded set remembering the newest keys (the oldest added is forgotten first)."""

    def __init__(self, maxlen: int = _RECENT) -> None:
        self.maxlen = maxlen
        self._keys: set[object] = set()
        self._order: deque[object] = deque()

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def add(self, key: object) -> None:
        if key in self._keys:
            return
        self._keys.add(key)
        self._order.append(key)
        if len(self._order) > self.maxlen:
            self._keys.discard(self._order.popleft())


class GridEngine:
    """Grid state for any number of symbols (the ``grid`` strategy)."""

    name = STRATEGY_NAME
    #: It decides on signals: a driver runs the signal engine in front of it.
    wants_signals = True

    def __init__(self, params: GridParams | None = None, *, assets: Assets | None = None) -> None:
        self.params = params or GridParams()
        self.orders: dict[str, dict[str, LiveOrder]] = {}
        #: The inventory: positions from fills (``assets``: symbol -> (base, quote)).
        self.book = FillBook(assets=assets)
        self._closed = _Recent()
        self._last: dict[str, tuple[int, list[OrderIntent]]] = {}
        #: live order -> its price in ticks (for :meth:`next_busy`)
        self._ticks: dict[str, int] = {}

    # -- state ----------------------------------------------------------------------------------
    def live(self, symbol: str) -> list[LiveOrder]:
        return list(self.orders.get(symbol, {}).values())

    def restore_order(self, order: LiveOrder) -> None:
        """Adopt an open order found at start (e.g. in the ``orders`` table)."""
        if order.client_order_id not in self._closed:
            self.orders.setdefault(order.symbol, {})[order.client_order_id] = order

    @property
    def inventory(self) -> dict[str, Decimal]:
        """Base units held per symbol (from the book)."""
        return {s: p.qty for s, p in self.book.portfolio.positions.items()}

    def forget(self, symbol: str) -> None:
        """Drop every state of ``symbol`` (another replica handles it now)."""
        for coid in self.orders.pop(symbol, {}):
            self._ticks.pop(coid, None)
        self.book.forget(symbol)
        self._last.pop(symbol, None)

    def _close(self, symbol: str, coid: str) -> None:
        self._closed.add(coid)
        self.orders.get(symbol, {}).pop(coid, None)
        self._ticks.pop(coid, None)

    # -- messages -------------------------------------------------------------------------------
    def on_message(self, msg: AnyMessage) -> list[OrderIntent]:
        """Dispatch one message; only signals produce intents."""
        if isinstance(msg, Signal):
            return self.on_signal(msg)
        if isinstance(msg, OrderFilled):
            self.on_filled(msg)
        elif isinstance(msg, OrderAccepted):
            self.on_accepted(msg)
        elif isinstance(msg, OrderCanceled):
            self._close(msg.symbol, msg.client_order_id)
        elif isinstance(msg, OrderRejected | OrderFailed):
            self._undo(msg.symbol, msg.client_order_id, msg.action)
        return []

    def _undo(self, symbol: str, coid: str, action: IntentAction) -> None:
        order = self.orders.get(symbol, {}).get(coid)
        if order is None:
            return
        if action == Actions.PLACE:
            self._close(symbol, coid)
        else:
            order.cancel_pending = False

    def on_accepted(self, msg: OrderAccepted) -> None:
        order = self.orders.get(msg.symbol, {}).get(msg.client_order_id)
        if order is not None:
            order.accepted = True
            return
        parsed = parse_level(msg.client_order_id)
        if parsed is None or msg.client_order_id in self._closed:
            return
        self.restore_order(
            LiveOrder(
                msg.client_order_id,
                msg.symbol,
                msg.side,
                msg.price,
                msg.qty,
                parsed[1],
                accepted=True,
            )
        )

    def on_filled(self, msg: OrderFilled) -> None:
        if not self.book.on_fill(msg):
            return
        order = self.orders.get(msg.symbol, {}).get(msg.client_order_id)
        if order is None:
            return
        order.filled += msg.qty
        if order.filled >= order.qty:
            self._close(msg.symbol, msg.client_order_id)

    # -- the grid -------------------------------------------------------------------------------
    def grid(self, signal: Signal) -> Grid:
        """The wanted grid for one signal, given the inventory held now."""
        p = self.params
        symbol = signal.symbol
        tick, step = p.tick(symbol), p.step(symbol)
        close = signal.close
        centre = round_to(Decimal(repr(signal.ema)), tick, ROUND_HALF_EVEN)
        atr = Decimal(repr(signal.atr)) if signal.atr == signal.atr else Decimal(0)
        raw = max(
            p.atr_mult * atr,
            p.min_spacing_bps * close / _BPS,
            2 * p.fee_bps * close / _BPS + tick,
        )
        spacing = round_to(raw, tick, ROUND_CEILING)
        levels: list[Level] = []
        available = max(self.book.qty(symbol), Decimal(0))
        selling = Decimal(0)
        sells_open = True
        for i in range(1, p.levels + 1):
            buy = centre - i * spacing
            if Decimal(0) < buy < close:
                qty = round_to(p.order_quote / buy, step, ROUND_FLOOR)
                if qty > 0:
                    levels.append(Level("BUY", i, buy, qty))
            sell = centre + i * spacing
            if sells_open and sell > close:
                qty = round_to(p.order_quote / sell, step, ROUND_FLOOR)
                if qty > 0 and selling + qty <= available:
                    selling += qty
                    levels.append(Level("SELL", i, sell, qty))
                elif qty > 0:
                    sells_open = False
        return Grid(centre, spacing, tuple(levels))

    # -- whole columns (a backtest that knows every signal) ---------------------------------
    def skip_plan(
        self, symbol: str, signals: SignalColumns, close_units: npt.NDArray[np.int64], places: int
    ) -> GridPlan | None:
        """The state-free part of ``symbol``'s wanted grids for every candle
        (:func:`gridstream.core.strategies.grid_scan.plan`), None if it cannot be made."""
        from gridstream.core.strategies import grid_scan

        return grid_scan.plan(self.params, symbol, signals, close_units, places)

    def next_busy(self, symbol: str, plan: GridPlan, start: int, stop: int) -> int:
        """The first candle in ``[start, stop)`` whose signal may make this engine, as it
        stands now, decide anything (``stop`` if none): a candle before it gives no intent
        (:func:`gridstream.core.strategies.grid_scan.next_busy`)."""
        from gridstream.core.strategies import grid_scan

        p = self.params
        tick, step = p.tick(symbol), p.step(symbol)
        live: list[int] = []
        is_buy: list[bool] = []
        known = self._ticks
        for o in self.orders.get(symbol, {}).values():
            if o.cancel_pending:
                continue
            t = known.get(o.client_order_id)
            if t is None:
                ticks = o.price / tick
                if ticks != ticks.to_integral_value():
                    return start  # off the tick grid (adopted): the engine decides
                t = known[o.client_order_id] = int(ticks)
            live.append(t)
            is_buy.append(o.side == "BUY")
        available = int(max(self.book.qty(symbol), Decimal(0)) / step)  # floor: >= 0
        return grid_scan.next_busy(
            plan,
            start,
            stop,
            np.asarray(live, dtype=np.int64),
            np.asarray(is_buy, dtype=np.bool_),
            available,
        )

    def on_signal(self, signal: Signal) -> list[OrderIntent]:
        symbol = signal.symbol
        last = self._last.get(symbol)
        if last is not None:
            if signal.open_time == last[0]:
                return list(last[1])
            if signal.open_time < last[0]:
                return []
        intents = self._decide(signal)
        self._last[symbol] = (signal.open_time, intents)
        for intent in intents:
            orders = self.orders.setdefault(symbol, {})
            if intent.action == Actions.PLACE:
                orders[intent.client_order_id] = LiveOrder(
                    intent.client_order_id,
                    symbol,
                    intent.side,
                    intent.price,
                    intent.qty,
                    intent.level,
                )
            elif intent.client_order_id in orders:
                orders[intent.client_order_id].cancel_pending = True
        return list(intents)

    def _decide(self, signal: Signal) -> list[OrderIntent]:
        if signal.regime == "warmup":
            return []
        active = [o for o in self.live(signal.symbol) if not o.cancel_pending]
        if signal.regime == "high_volatility":
            return [self._cancel(signal, o, "high_volatility") for o in active]
        grid = self.grid(signal)
        tolerance = self.params.tolerance * grid.spacing
        unmatched = list(active)
        to_place: list[Level] = []
        for want in grid.levels:
            # the nearest live order of its side within the tolerance (the first of equals)
            best = -1
            best_d = tolerance
            for k, o in enumerate(unmatched):
                if o.side != want.side:
                    continue
                d = abs(o.price - want.price)
                if d <= tolerance and (best < 0 or d < best_d):
                    best, best_d = k, d
            if best < 0:
                to_place.append(want)
            else:
                del unmatched[best]
        cancels = [self._cancel(signal, o, "off_grid") for o in unmatched]
        return cancels + [self._place(signal, lv) for lv in to_place]

    def _cancel(self, signal: Signal, order: LiveOrder, reason: str) -> OrderIntent:
        return OrderIntent(
            id=deterministic_id("intent", Actions.CANCEL, order.client_order_id, signal.open_time),
            ts_event=signal.ts_event,
            ts_init=signal.ts_init,
            action=Actions.CANCEL,
            symbol=order.symbol,
            client_order_id=order.client_order_id,
            side=order.side,
            price=order.price,
            qty=order.qty,
            level=order.level,
            strategy=STRATEGY_NAME,
            reason=reason,
        )

    def _place(self, signal: Signal, level: Level) -> OrderIntent:
        coid = client_order_id(signal.symbol, signal.open_time, level.side, level.level)
        return OrderIntent(
            id=deterministic_id("intent", Actions.PLACE, coid),
            ts_event=signal.ts_event,
            ts_init=signal.ts_init,
            action=Actions.PLACE,
            symbol=signal.symbol,
            client_order_id=coid,
            side=level.side,
            price=level.price,
            qty=level.qty,
            level=level.level,
            strategy=STRATEGY_NAME,
            reason=signal.regime,
        )


def restore(engine: GridEngine, orders: Iterable[LiveOrder], fills: Iterable[FillRow]) -> None:
    """Rebuild an engine's live orders and inventory (e.g. from the ledger) at start.

    ``fills`` are ledger ``fills`` rows (``gridstream.common.ledger.SELECT_FILLS``), oldest
    first, applied to the engine's book (each trade once).
    """
    engine.book.apply_rows(fills)
    for o in orders:
        engine.restore_order(o)
