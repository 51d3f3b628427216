"""Binance spot exchange filters from ``GET /api/v3/exchangeInfo``, as Decimals.

Pure: no I/O. :func:`parse_exchange_info` turns the JSON payload into one
:class:`SymbolFilters` per symbol; :meth:`SymbolFilters.check` says whether a
LIMIT order passes the filters, with a stable reason code when it does not.

Both filter generations are understood: the current ``NOTIONAL`` filter and the
older ``MIN_NOTIONAL`` one (recorded payloads from 2021 carry only the latter).
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import ROUND_DOWN, Decimal
from typing import Any, Final, Literal, TypeAlias

import msgspec


class Reasons:
    """Stable reason codes of a filter failure (names as Binance's filter types)."""

    PRICE_FILTER: Final = "PRICE_FILTER"
    LOT_SIZE: Final = "LOT_SIZE"
    NOTIONAL: Final = "NOTIONAL"


FilterSide: TypeAlias = Literal["BUY", "SELL"]
Failure: TypeAlias = tuple[str, str]
ZERO: Final = Decimal(0)


def _dec(value: object, default: Decimal = ZERO) -> Decimal:
    if value is None:
        return default
    return Decimal(str(value))


def _floor_to(value: Decimal, step: Decimal) -> Decimal:
    """``value`` rounded down to a multiple of ``step`` (unchanged when step is 0)."""
    if step <= 0:
        return value
    units = (value / step).to_integral_value(rounding=ROUND_DOWN)
    return (units * step).quantize(step)


def _on_step(value: Decimal, base: Decimal, step: Decimal) -> bool:
    if step <= 0:
        return True
    return (value - base) % step == 0


class SymbolFilters(msgspec.Struct, frozen=True, kw_only=True):
    """The trading rules of one spot symbol. A limit of 0 means "not set"."""

    symbol: str
    status: str = "TRADING"
    base_asset: str = ""
    quote_asset: str = ""
    base_precision: int = 8
    quote_precision: int = 8
    tick_size: Decimal = ZERO
    min_price: Decimal = ZERO
    max_price: Decimal = ZERO
    step_size: Decimal = ZERO
    min_qty: Decimal = ZERO
    max_qty: Decimal = ZERO
    min_notional: Decimal = ZERO
    max_notional: Decimal = ZERO

    def round_price(self, price: Decimal) -> Decimal:
        """``price`` rounded down to the tick size."""
        return _floor_to(price, self.tick_size)

    def round_qty(self, qty: Decimal) -> Decimal:
        """``qty`` rounded down to the step size."""
        return _floor_to(qty, self.step_size)

    def check(self, side: FilterSide, price: Decimal, qty: Decimal) -> Failure | None:
        """``None`` when a LIMIT order passes, else ``(reason code, human detail)``.

        ``side`` is accepted for symmetry with the venue; spot filters do not depend on it.
        """
        del side
        if price <= 0:
            return Reasons.PRICE_FILTER, f"price {price} must be > 0"
        if self.min_price > 0 and price < self.min_price:
            return Reasons.PRICE_FILTER, f"price {price} < minPrice {self.min_price}"
        if self.max_price > 0 and price > self.max_price:
            return Reasons.PRICE_FILTER, f"price {price} > maxPrice {self.max_price}"
        if not _on_step(price, self.min_price, self.tick_size):
            return Reasons.PRICE_FILTER, f"price {price} not on tickSize {self.tick_size}"
        if qty <= 0:
            return Reasons.LOT_SIZE, f"qty {qty} must be > 0"
        if self.min_qty > 0 and qty < self.min_qty:
            return Reasons.LOT_SIZE, f"qty {qty} < minQty {self.min_qty}"
        if self.max_qty > 0 and qty > self.max_qty:
            return Reasons.LOT_SIZE, f"qty {qty} > maxQty {self.max_qty}"
        if not _on_step(qty, self.min_qty, self.step_size):
            return Reasons.LOT_SIZE, f"qty {qty} not on stepSize {self.step_size}"
        notional = price * qty
        if self.min_notional > 0 and notional < self.min_notional:
            return Reasons.NOTIONAL, f"notional {notional} < minNotional {self.min_notional}"
        if self.max_notional > 0 and notional > self.max_notional:
            return Reasons.NOTIONAL, f"notional {notional} > maxNotional {self.max_notional}"
        return None


def parse_symbol(raw: Mapping[str, Any]) -> SymbolFilters:
    """One entry of ``exchangeInfo.symbols`` as :class:`SymbolFilters`."""
    fields: dict[str, Any] = {
        "symbol": str(raw["symbol"]),
        "status": str(raw.get("status", "TRADING")),
        "base_asset": str(raw.get("baseAsset", "")),
        "quote_asset": str(raw.get("quoteAsset", "")),
        "base_precision": int(raw.get("baseAssetPrecision", 8)),
        "quote_precision": int(raw.get("quoteAssetPrecision", raw.get("quotePrecision", 8))),
    }
    notional_seen = False
    for f in raw.get("filters", ()):
        kind = f.get("filterType")
        if kind == "PRICE_FILTER":
            fields["tick_size"] = _dec(f.get("tickSize"))
            fields["min_price"] = _dec(f.get("minPrice"))
            fields["max_price"] = _dec(f.get("maxPrice"))
        elif kind == "LOT_SIZE":
            fields["step_size"] = _dec(f.get("stepSize"))
            fields["min_qty"] = _dec(f.get("minQty"))
            fields["max_qty"] = _dec(f.get("maxQty"))
        elif kind == "NOTIONAL":
            fields["min_notional"] = _dec(f.get("minNotional"))
            fields["max_notional"] = _dec(f.get("maxNotional"))
            notional_seen = True
        elif kind == "MIN_NOTIONAL" and not notional_seen:
            fields["min_notional"] = _dec(f.get("minNotional"))
    return SymbolFilters(**fields)


def parse_exchange_info(
    payload: Mapping[str, Any], symbols: list[str] | tuple[str, ...] | None = None
) -> dict[str, SymbolFilters]:
    """``GET /api/v3/exchangeInfo`` as ``{symbol: SymbolFilters}``, optionally only ``symbols``."""
    wanted = {s.upper() for s in symbols} if symbols is not None else None
    out: dict[str, SymbolFilters] = {}
    for raw in payload.get("symbols", ()):
        name = str(raw.get("symbol", "")).upper()
        if wanted is not None and name not in wanted:
            continue
        out[name] = parse_symbol(raw)
    return out
