from __future__ import annotations

from decimal import Decimal as D

import pytest

from gridstream.core.fills import (
    arrival_fill,
    commission,
    crosses,
    resting_fill,
    would_cross_on_arrival,
)

FEE = D("0.001")


@pytest.mark.parametrize(
    ("side", "limit", "trade", "hit"),
    [
        ("BUY", D("100"), D("100"), True),
        ("BUY", D("100"), D("99.99"), True),
        ("BUY", D("100"), D("100.01"), False),
        ("SELL", D("100"), D("100"), True),
        ("SELL", D("100"), D("100.01"), True),
        ("SELL", D("100"), D("99.99"), False),
    ],
)
def test_crosses(side: str, limit: D, trade: D, hit: bool) -> None:
    assert crosses(side, limit, trade) is hit  # type: ignore[arg-type]
    fd = resting_fill(side, limit, D("0.5"), trade, FEE)  # type: ignore[arg-type]
    assert (fd is not None) is hit


def test_resting_buy_fills_at_own_price_as_maker_fee_in_base() -> None:
    fd = resting_fill("BUY", D("100.00"), D("0.12345"), D("99.50"), FEE)
    assert fd is not None
    assert fd.price == D("100.00")
    assert fd.qty == D("0.12345")
    assert fd.is_maker
    assert fd.fee == D("0.00012345")
    assert fd.fee_asset_is_base
    assert fd.quote_qty == D("12.34500")


def test_resting_sell_fee_in_quote_and_cap() -> None:
    fd = resting_fill("SELL", D("100"), D("2"), D("101"), FEE, liquidity_cap=D("0.5"))
    assert fd is not None
    assert fd.qty == D("0.5")
    assert fd.fee == D("0.05000000")
    assert not fd.fee_asset_is_base
    assert resting_fill("SELL", D("100"), D("0"), D("101"), FEE) is None


def test_arrival_fill_taker_at_last_price() -> None:
    assert would_cross_on_arrival("BUY", D("101"), D("100"))
    assert not would_cross_on_arrival("BUY", D("99"), D("100"))
    fd = arrival_fill("BUY", D("101"), D("1"), D("100"), D("0.002"))
    assert fd is not None
    assert (fd.price, fd.liquidity, fd.fee) == (D("100"), "taker", D("0.00200000"))
    assert arrival_fill("SELL", D("101"), D("1"), D("100"), FEE) is None
    mkt = arrival_fill("SELL", None, D("1"), D("100"), FEE)
    assert mkt is not None
    assert mkt.fee == D("0.10000000")


def test_commission_rounds_half_up_to_8dp() -> None:
    assert commission("BUY", D("1"), D("0.000000015"), D("1")) == D("0.00000002")
    assert commission("SELL", D("3"), D("0.1"), D("0.001")) == D("0.00030000")
