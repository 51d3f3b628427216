"""Round trips when a buy's fee is paid in the base asset."""

from __future__ import annotations

from decimal import Decimal as D

from gridstream.core.backtest import Fill
from gridstream.core.performance import round_trips


def fill(side: str, price: str, qty: str, fee: str, asset: str) -> Fill:
    return Fill(0, "BTCUSDT", side, D(price), D(qty), D(fee), asset, "taker", "x")  # type: ignore[arg-type]


def test_a_base_fee_leaves_no_stale_lot_behind():
    fills = [
        fill("BUY", "100", "1", "0.001", "BTC"),  # 0.999 held
        fill("SELL", "110", "0.999", "0.10989", "USDT"),
        fill("BUY", "200", "1", "0.001", "BTC"),
        fill("SELL", "190", "0.999", "0.18981", "USDT"),
    ]
    first, second = round_trips(fills, {"BTCUSDT": "USDT"})
    # (110 - 100) x 0.999 - the buy fee (0.001 BTC at 100) - the sell fee
    assert abs(first - (9.99 - 0.1 - 0.10989)) < 1e-9
    # the second trip is matched against its own buy only
    assert abs(second - (-9.99 - 0.2 - 0.18981)) < 1e-9
