"""The portfolio: balances per asset, positions, average cost, PnL and equity.

One implementation for every part that needs a view of holdings (the backtester today;
strategy, risk, the executor and ``gridstream status`` as they move onto the kernel).
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
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Literal

ZERO = Decimal(0)
Side = Literal["BUY", "SELL"]


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
            if q != quote:
                raise ValueError(f"{symbol}: quote {q} is not the portfolio's {quote}")
            p.positions[symbol] = Position(symbol=symbol, base=base, quote=q)
            p.balances.setdefault(base, ZERO)
        return p

    def balance(self, asset: str) -> Decimal:
        return self.balances.get(asset, ZERO)

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
            if fee_asset == pos.base:
                # the fee came out of the holding: less quantity, its cost goes with it
                avg = pos.avg_cost
                pos.qty -= fee
                pos.cost -= avg * fee
                pos.realised += (price - avg) * fee
                pos.fees += fee * price
            elif fee_asset == pos.quote:
                pos.fees += fee
            else:
                raise ValueError(f"{symbol}: fee in {fee_asset}, neither base nor quote")
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
