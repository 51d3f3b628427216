"""Exchange filters parsed from real recorded exchangeInfo payloads."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from gridstream.common.binance.filters import (
    Reasons,
    SymbolFilters,
    parse_exchange_info,
    parse_symbol,
)

FIXTURES = Path(__file__).parent / "fixtures" / "binance"
FIVE = ["BTCUSDT", "ETHUSDT", "BNBUSDT", "SOLUSDT", "XRPUSDT"]


def load(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


@pytest.fixture
def five() -> dict[str, SymbolFilters]:
    return parse_exchange_info(load("exchangeInfo-cryptofeed-2021-10-12-5symbols.json"))


def test_recorded_five_symbols_parse_with_real_values(five: dict[str, SymbolFilters]) -> None:
    assert sorted(five) == sorted(FIVE)
    btc = five["BTCUSDT"]
    assert btc.base_asset == "BTC"
    assert btc.quote_asset == "USDT"
    assert btc.tick_size == Decimal("0.01")
    assert btc.min_price == Decimal("0.01")
    assert btc.max_price == Decimal("1000000")
    assert btc.step_size == Decimal("0.00001")
    assert btc.min_qty == Decimal("0.00001")
    assert btc.max_qty == Decimal("9000")
    # 2021 payload: only the old MIN_NOTIONAL filter exists.
    assert btc.min_notional == Decimal("10")
    assert btc.base_precision == 8
    assert five["BNBUSDT"].tick_size == Decimal("0.1")
    assert five["XRPUSDT"].step_size == Decimal("1")
    assert five["SOLUSDT"].step_size == Decimal("0.01")


def test_subset_and_case_insensitive_selection() -> None:
    got = parse_exchange_info(
        load("exchangeInfo-cryptofeed-2021-10-12-5symbols.json"), ["btcusdt", "XRPUSDT"]
    )
    assert sorted(got) == ["BTCUSDT", "XRPUSDT"]


def test_nautilus_recorded_payload() -> None:
    got = parse_exchange_info(load("exchangeInfo-nautilus-2021-10-22.json"))
    assert sorted(got) == ["BTCUSDT", "ETHUSDT"]
    assert got["ETHUSDT"].step_size == Decimal("0.0001")


def test_official_docs_payload_without_filters() -> None:
    got = parse_exchange_info(load("exchangeInfo-official-docs.json"))
    eth = got["ETHBTC"]
    assert eth.tick_size == 0
    assert eth.check("BUY", Decimal("0.05"), Decimal("1")) is None


def test_new_notional_filter_wins_over_old_min_notional() -> None:
    raw = {
        "symbol": "BTCUSDT",
        "filters": [
            {"filterType": "NOTIONAL", "minNotional": "5.00000000", "maxNotional": "9000000.0"},
            {"filterType": "MIN_NOTIONAL", "minNotional": "10.00000000"},
        ],
    }
    f = parse_symbol(raw)
    assert f.min_notional == Decimal("5")
    assert f.max_notional == Decimal("9000000")


def test_round_down_to_tick_and_step(five: dict[str, SymbolFilters]) -> None:
    btc = five["BTCUSDT"]
    assert btc.round_price(Decimal("70070.539")) == Decimal("70070.53")
    assert btc.round_qty(Decimal("0.000129")) == Decimal("0.00012")
    assert five["XRPUSDT"].round_qty(Decimal("17.9")) == Decimal("17")
    assert five["BNBUSDT"].round_price(Decimal("612.37")) == Decimal("612.3")


@pytest.mark.parametrize(
    ("price", "qty", "reason"),
    [
        ("70000.00", "0.001", None),
        ("70000.005", "0.001", Reasons.PRICE_FILTER),
        ("0", "0.001", Reasons.PRICE_FILTER),
        ("0.001", "0.001", Reasons.PRICE_FILTER),
        ("2000000", "0.001", Reasons.PRICE_FILTER),
        ("70000", "0.000015", Reasons.LOT_SIZE),
        ("70000", "0.000001", Reasons.LOT_SIZE),
        ("70000", "9001", Reasons.LOT_SIZE),
        ("70000", "0.0001", Reasons.NOTIONAL),
        ("100000", "0.0001", None),
    ],
)
def test_check_btcusdt(
    five: dict[str, SymbolFilters], price: str, qty: str, reason: str | None
) -> None:
    result = five["BTCUSDT"].check("BUY", Decimal(price), Decimal(qty))
    if reason is None:
        assert result is None
    else:
        assert result is not None
        assert result[0] == reason
        assert result[1]


def test_rounded_values_always_pass_tick_and_step(five: dict[str, SymbolFilters]) -> None:
    for f in five.values():
        price = f.round_price(Decimal("1.23456789") * 1000)
        qty = f.round_qty(Decimal("50") / price) + f.step_size
        assert f.check("SELL", price, qty) is None, f.symbol
