"""The portfolio: balances per asset, positions, average cost, PnL and equity.

One implementation for every part that needs a view of holdings: the backtester, risk,
the strategy, the executor and ``gridstream status``.
Pure: fills and prices in, numbers out; ``Decimal`` throughout.

Rules:

* A fill moves balances as the venue does: a BUY spends ``price x qty`` of the quote asset
  and receives ``qty`` of the base; a SELL the reverse. The fee is taken from the asset it
  is charged in (``fee_asset``): on Binance the asset received, unless fees are paid in
  another asset.
* A position's cost basis is what its held quantity cost at the fill prices, fees left
  out; its average cost is ``cost / qty``. A sell realises ``(price - avg_cost) x qty``.
  A fee paid in the base asset reduces the held quantity and is counted among the fees,
  valued at the fill price, so that always, in the quote asset,
  ``equity - start = realised + unrealised - fees`` (checked by the tests).
* Equity is the quote balance plus every other balance marked to its symbol's last price
  (assets with no price yet are marked at zero).
* A fee paid in a third asset (BNB on Binance) comes out of that asset's balance and is
  counted among the fees paid by asset; it cannot be valued in the quote asset from the
  fill alone, so it stays out of :meth:`Portfolio.fees` (and out of equity, that asset
  having no price).

Services do not know the account's cash from fills alone: they build the portfolio with
:func:`book_from_fills` out of the ledger's ``fills`` rows and feed it ``OrderFilled``
messages through a :class:`FillBook`, which applies each (venue, symbol, trade id) once.
Positions, average cost and PnL are then right; balances hold the fills' net flows until
the account's balances are set (:meth:`Portfolio.set_balances`) where they are known.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Final, Literal, Protocol

from gridstream.common.binance.filters import SymbolFilters
from gridstream.common.messages import OrderFilled

ZERO = Decimal(0)
Side = Literal["BUY", "SELL"]
#: Quote assets recognised when splitting a symbol into base and quote.
QUOTE_ASSETS: Final = ("FDUSD", "USDT", "USDC", "TUSD", "BUSD", "EUR", "TRY", "BTC", "ETH", "BNB")
#: How many (venue, symbol, trade id) keys a :class:`FillBook` remembers.
FILL_MEMORY: Final = 1_000_000
#: symbol -> (base asset, quote asset), e.g. from the venue's exchange filters.
Assets = Mapping[str, tuple[str, str]]


def split_symbol(symbol: str) -> tuple[str, str]:
    """(base, quote) of a spot symbol by its quote suffix (``BTCUSDT`` -> ``BTC``, ``USDT``);
    ``(symbol, "")`` when no known quote asset ends it."""
    for quote in QUOTE_ASSETS:
        if symbol.endswith(quote) and len(symbol) > len(quote):
            return symbol[: -len(quote)], quote
    return symbol, ""


def assets_of(filters: Mapping[str, SymbolFilters]) -> dict[str, tuple[str, str]]:
    """symbol -> (base, quote) as the venue's exchange filters name them (where they do)."""
    return {
        s: (f.base_asset, f.quote_asset)
        for s, f in filters.items()
        if f.base_asset and f.quote_asset
    }


def base_asset(symbol: str) -> str:
    """The base asset of a spot symbol (``BTCUSDT`` -> ``BTC``), by its quote suffix."""
    return split_symbol(symbol)[0]


@dataclass(slots=True)
class Position:
    """One symbol's holding in its base asset."""

    symbol: str
    base: str
    quote: str
    qty: Decimal = ZERO
    #: What the held quantity cost, at fill prices, without fees.
    cost: Decimal = ZERO
    realised: Decimal = ZERO
    #: Fees of this symbol's fills, valued in the quote asset at the fill price.
    fees: Decimal = ZERO
    last_price: Decimal | None = None
    #: Quote notional bought and sold (turnover).
    bought: Decimal = ZERO
    sold: Decimal = ZERO
    #: Fees of this symbol's fills by the asset they were paid in.
    fees_by_asset: dict[str, Decimal] = field(default_factory=dict)

    @property
    def avg_cost(self) -> Decimal:
        return self.cost / self.qty if self.qty else ZERO

    @property
    def unrealised(self) -> Decimal:
        if self.last_price is None or not self.qty:
            return ZERO
        return self.last_price * self.qty - self.cost

    @property
    def value(self) -> Decimal:
        return ZERO if self.last_price is None else self.last_price * self.qty


@dataclass
class Portfolio:
    """Balances by asset and positions by symbol, in one quote asset."""

    quote: str
    balances: dict[str, Decimal] = field(default_factory=dict)
    positions: dict[str, Position] = field(default_factory=dict)
    #: Fees by the asset they were paid in.
    fees_paid: dict[str, Decimal] = field(default_factory=dict)
    start_equity: Decimal = ZERO

    @classmethod
    def start(cls, quote: str, cash: Decimal, symbols: Mapping[str, tuple[str, str]]) -> Portfolio:
        """A portfolio holding ``cash`` of ``quote``, ready for ``symbols`` (symbol ->
        (base, quote))."""
        p = cls(quote=quote, balances={quote: cash}, start_equity=cash)
        for symbol, (base, q) in symbols.items():
            p.add(symbol, base, q)
            p.balances.setdefault(base, ZERO)
        return p

    def add(self, symbol: str, base: str, quote: str) -> Position:
        """The position of ``symbol``, made empty if new. A portfolio made without a quote
        asset takes the first symbol's; every symbol must share it (equity is in it)."""
        pos = self.positions.get(symbol)
        if pos is not None:
            return pos
        if not self.quote:
            self.quote = quote
        if quote != self.quote:
            raise ValueError(f"{symbol}: quote {quote} is not the portfolio's {self.quote}")
        pos = self.positions[symbol] = Position(symbol=symbol, base=base, quote=quote)
        return pos

    def forget(self, symbol: str) -> None:
        """Drop ``symbol``'s position and take what its fills moved out of the balances and
        fees (e.g. before rebuilding it from the ledger)."""
        pos = self.positions.pop(symbol, None)
        if pos is None:
            return
        b = self.balances
        b[pos.base] = b.get(pos.base, ZERO) - pos.qty
        b[pos.quote] = b.get(pos.quote, ZERO) - (pos.sold - pos.bought)
        for asset, fee in pos.fees_by_asset.items():
            if asset != pos.base:  # a base fee is already out of the quantity
                b[asset] = b.get(asset, ZERO) + fee
            self.fees_paid[asset] = self.fees_paid.get(asset, ZERO) - fee

    def set_balances(self, balances: Mapping[str, Decimal]) -> None:
        """The account's balances as the venue reports them (they replace the fills' flows);
        equity is then the account's."""
        self.balances = dict(balances)

    def balance(self, asset: str) -> Decimal:
        return self.balances.get(asset, ZERO)

    def qty(self, symbol: str) -> Decimal:
        """Base units held of ``symbol`` (0 when it has no position)."""
        pos = self.positions.get(symbol)
        return ZERO if pos is None else pos.qty

    def apply_fill(
        self,
        symbol: str,
        side: Side,
        price: Decimal,
        qty: Decimal,
        fee: Decimal,
        fee_asset: str,
    ) -> None:
        pos = self.positions[symbol]
        notional = price * qty
        b = self.balances
        if side == "BUY":
            b[pos.quote] = b.get(pos.quote, ZERO) - notional
            b[pos.base] = b.get(pos.base, ZERO) + qty
            pos.qty += qty
            pos.cost += notional
            pos.bought += notional
        else:
            avg = pos.avg_cost
            b[pos.quote] = b.get(pos.quote, ZERO) + notional
            b[pos.base] = b.get(pos.base, ZERO) - qty
            pos.realised += (price - avg) * qty
            pos.cost -= avg * qty
            pos.qty -= qty
            pos.sold += notional
            if not pos.qty:
                pos.cost = ZERO
        if fee:
            b[fee_asset] = b.get(fee_asset, ZERO) - fee
            self.fees_paid[fee_asset] = self.fees_paid.get(fee_asset, ZERO) + fee
            by_asset = pos.fees_by_asset
            by_asset[fee_asset] = by_asset.get(fee_asset, ZERO) + fee
            if fee_asset == pos.base:
                # the fee came out of the holding: less quantity, its cost goes with it
                avg = pos.avg_cost
                pos.qty -= fee
                pos.cost -= avg * fee
                pos.realised += (price - avg) * fee
                pos.fees += fee * price
            elif fee_asset == pos.quote:
                pos.fees += fee
            # a third asset (BNB): out of its balance, not valued in the quote asset
        pos.last_price = price

    def mark(self, symbol: str, price: Decimal) -> None:
        self.positions[symbol].last_price = price

    def equity(self) -> Decimal:
        """Quote balance plus every position marked to its last price."""
        total = self.balance(self.quote)
        for pos in self.positions.values():
            held = self.balance(pos.base)
            if held and pos.last_price is not None:
                total += held * pos.last_price
        return total

    def realised(self) -> Decimal:
        return sum((p.realised for p in self.positions.values()), ZERO)

    def unrealised(self) -> Decimal:
        return sum((p.unrealised for p in self.positions.values()), ZERO)

    def fees(self) -> Decimal:
        """Every fee, valued in the quote asset at its fill's price."""
        return sum((p.fees for p in self.positions.values()), ZERO)

    def turnover(self) -> Decimal:
        return sum((p.bought + p.sold for p in self.positions.values()), ZERO)

    def snapshot(self, symbols: Iterable[str] | None = None) -> dict[str, Decimal]:
        names = self.positions if symbols is None else symbols
        return {s: self.positions[s].qty for s in names}


class FillRow(Protocol):
    """One row of the ledger's ``fills`` table (an asyncpg record, or any mapping) with
    the columns ``gridstream.common.ledger.SELECT_FILLS`` reads: venue, symbol, trade_id,
    side, price, qty, fee and fee_asset."""

    def __getitem__(self, key: str, /) -> Any: ...


class FillBook:
    """A :class:`Portfolio` fed by fills, each (venue, symbol, trade id) applied once.

    The one position keeper of the services: risk, the strategy, the executor and
    ``gridstream status`` each hold one, rebuilt from the ledger (:meth:`apply_rows`) and
    moved by ``OrderFilled`` messages (:meth:`on_fill`), so a fill re-read from a stream
    after a restart counts once. A symbol's base and quote assets come from ``assets``
    (the venue's exchange filters), else from its name (:func:`split_symbol`).
    """

    def __init__(
        self,
        portfolio: Portfolio | None = None,
        *,
        assets: Assets | None = None,
        memory: int = FILL_MEMORY,
        cash_known: bool = False,
    ) -> None:
        self.portfolio = portfolio if portfolio is not None else Portfolio(quote="")
        self.assets: dict[str, tuple[str, str]] = {
            s: a for s, a in (assets or {}).items() if a[0] and a[1]
        }
        self.memory = memory
        #: True when the balances are the account's (its cash given or its balances set),
        #: not only the fills' net flows: equity then means the account's equity.
        self.cash_known = cash_known
        self._seen: OrderedDict[tuple[str, str, str], None] = OrderedDict()

    # -- queries ----------------------------------------------------------------------------
    def qty(self, symbol: str) -> Decimal:
        return self.portfolio.qty(symbol)

    def seen(self, venue: str, symbol: str, trade_id: object) -> bool:
        return (venue, symbol, str(trade_id)) in self._seen

    # -- fills ------------------------------------------------------------------------------
    def position(self, symbol: str) -> Position:
        """``symbol``'s position, made (empty) with its assets if new."""
        pos = self.portfolio.positions.get(symbol)
        if pos is not None:
            return pos
        base, quote = self.assets.get(symbol) or split_symbol(symbol)
        return self.portfolio.add(symbol, base, quote)

    def apply(
        self,
        venue: str,
        symbol: str,
        trade_id: object,
        side: Side,
        price: Decimal,
        qty: Decimal,
        fee: Decimal,
        fee_asset: str,
    ) -> bool:
        """Apply one trade unless this (venue, symbol, trade id) was applied; True if new."""
        key = (venue, symbol, str(trade_id))
        if key in self._seen:
            return False
        self.position(symbol)
        self.portfolio.apply_fill(symbol, side, price, qty, fee, fee_asset)
        self._seen[key] = None
        if len(self._seen) > self.memory:
            self._seen.popitem(last=False)
        return True

    def on_fill(self, fill: OrderFilled) -> bool:
        """Apply one ``OrderFilled`` message (once); True if new."""
        return self.apply(
            fill.venue,
            fill.symbol,
            fill.trade_id,
            fill.side,
            fill.price,
            fill.qty,
            fill.fee,
            fill.fee_asset,
        )

    def apply_rows(self, rows: Iterable[FillRow]) -> int:
        """Apply ledger ``fills`` rows (oldest first); how many were new."""
        n = 0
        for r in rows:
            n += self.apply(
                str(r["venue"]),
                str(r["symbol"]),
                r["trade_id"],
                r["side"],
                Decimal(r["price"]),
                Decimal(r["qty"]),
                Decimal(r["fee"]),
                str(r["fee_asset"]),
            )
        return n

    def mark(self, symbol: str, price: Decimal) -> None:
        """Mark ``symbol`` at ``price`` (e.g. the last candle's close)."""
        self.position(symbol)
        self.portfolio.mark(symbol, price)

    def set_balances(self, balances: Mapping[str, Decimal]) -> None:
        """The account's balances, where the venue reports them (equity is then known)."""
        self.portfolio.set_balances(balances)
        self.cash_known = True

    def forget(self, symbol: str) -> None:
        """Drop every state of ``symbol`` (its position and the trades it remembers)."""
        self.portfolio.forget(symbol)
        for key in [k for k in self._seen if k[1] == symbol]:
            del self._seen[key]


def book_from_fills(
    rows: Iterable[FillRow],
    *,
    assets: Assets | None = None,
    quote: str = "",
    cash: Decimal | None = None,
    balances: Mapping[str, Decimal] | None = None,
) -> FillBook:
    """A :class:`FillBook` rebuilt from the ledger's ``fills`` rows (oldest first).

    The account's cash is not in the ledger: without ``cash`` (the quote balance before
    the first fill) or ``balances`` (the account's balances now, as the venue reports
    them) the balances are the fills' net flows, and only positions and PnL mean much.
    """
    if cash is not None and not quote:
        raise ValueError("cash needs its quote asset")
    portfolio = Portfolio(quote=quote)
    if cash is not None:
        portfolio = Portfolio.start(quote, cash, {})
    book = FillBook(portfolio, assets=assets, cash_known=cash is not None)
    book.apply_rows(rows)
    if balances is not None:
        book.set_balances(balances)
    return book
