"""Exchange filters of the simulated symbols and the ``exchangeInfo`` payload."""

from __future__ import annotations

import json
from dataclasses import dataclass
from decimal import Decimal
from importlib import resources
from typing import Any


@dataclass(frozen=True, slots=True)
class SymbolSpec:
    symbol: str
    base: str
    quote: str
    min_price: Decimal
    max_price: Decimal
    tick: Decimal
    min_qty: Decimal
    max_qty: Decimal
    step: Decimal
    market_max_qty: Decimal
    min_notional: Decimal
    raw: dict[str, Any]


def load_specs() -> dict[str, SymbolSpec]:
    text = resources.files("gridstream.simulator").joinpath("symbols.json").read_text()
    data = json.loads(text)["symbols"]
    out: dict[str, SymbolSpec] = {}
    for sym, r in data.items():
        out[sym] = SymbolSpec(
            symbol=sym,
            base=r["baseAsset"],
            quote=r["quoteAsset"],
            min_price=Decimal(r["minPrice"]),
            max_price=Decimal(r["maxPrice"]),
            tick=Decimal(r["tickSize"]).normalize(),
            min_qty=Decimal(r["minQty"]),
            max_qty=Decimal(r["maxQty"]),
            step=Decimal(r["stepSize"]).normalize(),
            market_max_qty=Decimal(r["marketMaxQty"]),
            min_notional=Decimal(r["minNotional"]),
            raw=r,
        )
    return out


QUOTE_ASSETS = ("FDUSD", "USDT", "USDC", "BUSD", "TUSD", "BTC", "ETH", "BNB", "EUR", "TRY")


def split_symbol(symbol: str) -> tuple[str, str]:
    """Base and quote asset of ``symbol`` by its known quote suffix (else last 4 letters)."""
    for q in QUOTE_ASSETS:
        if symbol.endswith(q) and len(symbol) > len(q):
            return symbol[: -len(q)], q
    return symbol[:-4] or symbol, symbol[-4:]


def _s8(d: Decimal) -> str:
    return f"{d.quantize(Decimal('0.00000001')):f}"


def derived_spec(
    symbol: str,
    tick: Decimal,
    step: Decimal,
    min_notional: Decimal = Decimal(0),
    base_on: SymbolSpec | None = None,
) -> SymbolSpec:
    """A spec for a symbol without recorded filters (or with overridden tick/step).

    ``base_on`` keeps a known symbol's other filters; otherwise minPrice = tick,
    maxPrice = 1e8, minQty = step, maxQty = 9e6, minNotional as given (default 0).
    """
    if base_on is not None:
        r = dict(base_on.raw)
        base, quote = base_on.base, base_on.quote
    else:
        base, quote = split_symbol(symbol)
        r = {
            "baseAsset": base,
            "quoteAsset": quote,
            "maxPrice": _s8(Decimal(100_000_000)),
            "maxQty": _s8(Decimal(9_000_000)),
            "marketMaxQty": _s8(Decimal(9_000_000)),
            "icebergParts": 10,
            "maxNumOrders": 200,
            "maxNumAlgoOrders": 5,
        }
        r["minNotional"] = _s8(min_notional)
    r.update(
        {"minPrice": _s8(tick), "tickSize": _s8(tick), "minQty": _s8(step), "stepSize": _s8(step)}
    )
    if base_on is not None and min_notional:
        r["minNotional"] = _s8(min_notional)
    return SymbolSpec(
        symbol=symbol,
        base=base,
        quote=quote,
        min_price=Decimal(r["minPrice"]),
        max_price=Decimal(r["maxPrice"]),
        tick=tick.normalize(),
        min_qty=Decimal(r["minQty"]),
        max_qty=Decimal(r["maxQty"]),
        step=step.normalize(),
        market_max_qty=Decimal(r["marketMaxQty"]),
        min_notional=Decimal(r["minNotional"]),
        raw=r,
    )


RATE_LIMITS: list[dict[str, Any]] = [
    {"rateLimitType": "REQUEST_WEIGHT", "interval": "MINUTE", "intervalNum": 1, "limit": 6000},
    {"rateLimitType": "ORDERS", "interval": "SECOND", "intervalNum": 10, "limit": 100},
    {"rateLimitType": "ORDERS", "interval": "DAY", "intervalNum": 1, "limit": 200000},
    {"rateLimitType": "RAW_REQUESTS", "interval": "MINUTE", "intervalNum": 5, "limit": 61000},
]


def symbol_info(spec: SymbolSpec) -> dict[str, Any]:
    """One ``symbols[]`` entry in the current Binance format."""
    r = spec.raw
    return {
        "symbol": spec.symbol,
        "status": "TRADING",
        "baseAsset": spec.base,
        "baseAssetPrecision": 8,
        "quoteAsset": spec.quote,
        "quotePrecision": 8,
        "quoteAssetPrecision": 8,
        "baseCommissionPrecision": 8,
        "quoteCommissionPrecision": 8,
        "orderTypes": ["LIMIT", "LIMIT_MAKER", "MARKET"],
        "icebergAllowed": False,
        "ocoAllowed": False,
        "otoAllowed": False,
        "opoAllowed": False,
        "quoteOrderQtyMarketAllowed": True,
        "allowTrailingStop": False,
        "cancelReplaceAllowed": False,
        "amendAllowed": False,
        "pegInstructionsAllowed": False,
        "isSpotTradingAllowed": True,
        "isMarginTradingAllowed": False,
        "filters": [
            {
                "filterType": "PRICE_FILTER",
                "minPrice": r["minPrice"],
                "maxPrice": r["maxPrice"],
                "tickSize": r["tickSize"],
            },
            {
                "filterType": "LOT_SIZE",
                "minQty": r["minQty"],
                "maxQty": r["maxQty"],
                "stepSize": r["stepSize"],
            },
            {"filterType": "ICEBERG_PARTS", "limit": r["icebergParts"]},
            {
                "filterType": "MARKET_LOT_SIZE",
                "minQty": "0.00000000",
                "maxQty": r["marketMaxQty"],
                "stepSize": "0.00000000",
            },
            {
                "filterType": "NOTIONAL",
                "minNotional": r["minNotional"],
                "applyMinToMarket": True,
                "maxNotional": "9000000.00000000",
                "applyMaxToMarket": False,
                "avgPriceMins": 5,
            },
            {"filterType": "MAX_NUM_ORDERS", "maxNumOrders": r["maxNumOrders"]},
            {"filterType": "MAX_NUM_ALGO_ORDERS", "maxNumAlgoOrders": r["maxNumAlgoOrders"]},
        ],
        "permissions": [],
        "permissionSets": [["SPOT"]],
        "defaultSelfTradePreventionMode": "NONE",
        "allowedSelfTradePreventionModes": ["NONE"],
    }


def exchange_info(
    specs: list[SymbolSpec], server_time_ms: int, weight_limit: int = 6000
) -> dict[str, Any]:
    limits = [dict(x) for x in RATE_LIMITS]
    limits[0]["limit"] = weight_limit
    return {
        "timezone": "UTC",
        "serverTime": server_time_ms,
        "rateLimits": limits,
        "exchangeFilters": [],
        "symbols": [symbol_info(s) for s in specs],
    }
