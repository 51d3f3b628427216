"""The backtester drives the kernel's order state machine, as the executor does: every
order's final status and filled quantity are the machine's, and they agree with the fills
and cancels the run produced."""

from __future__ import annotations

from collections import defaultdict
from decimal import Decimal

import pytest

from gridstream.common.binance.filters import SymbolFilters
from gridstream.common.ledger import LedgerStatus
from gridstream.core.backtest import Backtester, FillSettings
from gridstream.core.risk import RiskEngine
from gridstream.core.strategies.grid import GridEngine, GridParams
from gridstream.core.strategies.sma_cross import SmaCross, SmaCrossParams

from .test_columnar import SYMBOLS, bars


@pytest.mark.parametrize(
    "fill",
    [FillSettings(), FillSettings(latency_ms=30_000, volume_share=Decimal("0.01"))],
)
def test_every_grid_order_ends_as_the_machine_says(fill):
    data = {s: bars(s, 6_000) for s in SYMBOLS}
    risk = RiskEngine({s: SymbolFilters(symbol=s) for s in SYMBOLS})
    result = Backtester(
        GridEngine(GridParams(order_quote=Decimal("50"))),
        SYMBOLS,
        cash=Decimal(2000),
        fill=fill,
        risk=risk,
    ).run({s: b.candles() for s, b in data.items()})
    filled: dict[str, Decimal] = defaultdict(Decimal)
    for f in result.fills:
        filled[f.client_order_id] += f.qty
    assert len(result.fills) > 50
    statuses = {o.status for o in result.orders.values()}
    assert LedgerStatus.FILLED in statuses and LedgerStatus.CANCELED in statuses
    for coid, state in result.orders.items():
        assert state.filled_qty == filled.get(coid, Decimal(0)), coid
        if state.status == LedgerStatus.FILLED:
            assert state.filled_qty == state.qty, coid
        elif state.status == LedgerStatus.PARTIALLY_FILLED:
            assert 0 < state.filled_qty < state.qty, coid
        elif state.status == LedgerStatus.ACCEPTED:
            assert state.filled_qty == 0, coid
        else:
            assert state.status == LedgerStatus.CANCELED, (coid, state.status)
    # what is still open at the end is what the book holds
    still_open = {c for c, s in result.orders.items() if s.is_open}
    risk_open = set(risk.open_orders)
    assert still_open == risk_open


def test_market_orders_go_from_pending_to_filled():
    data = {"BTCUSDT": bars("BTCUSDT", 3_000)}
    result = Backtester(
        SmaCross(SmaCrossParams(qty=Decimal("0.002"))),
        {"BTCUSDT": ("BTC", "USDT")},
        cash=Decimal(700),
    ).run({s: b.candles() for s, b in data.items()})
    assert result.fills
    assert {o.status for o in result.orders.values()} == {LedgerStatus.FILLED}
    assert len(result.orders) == len({f.client_order_id for f in result.fills})
