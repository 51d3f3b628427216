"""The columnar run of a strategy equals its candle-by-candle run, fill for fill.

``Backtester.run_columnar`` steps only the bars where the strategy may decide (its
``decision_bars``) or where an order is open, and fills the equity in between from the
balances. On real candles, under every fill setting that changes when and how orders
fill, it must give the very fills, equity curve and portfolio of ``Backtester.run``.
"""

from __future__ import annotations

import gzip
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest

from gridstream.core import performance
from gridstream.core.backtest import Backtester, BacktestResult, Bars, FillSettings
from gridstream.core.strategies.sma_cross import SmaCross, SmaCrossParams

REPO = Path(__file__).resolve().parents[3]


def bars(symbol: str, n: int) -> Bars:
    rows = []
    with gzip.open(REPO / "data" / "klines" / f"{symbol}-1m.csv.gz", "rt") as fh:
        next(fh)
        for line in fh:
            rows.append(line.rstrip("\n").split(","))
            if len(rows) == n:
                break
    close = [r[4] for r in rows]
    return Bars(
        symbol=symbol,
        interval="1m",
        interval_ms=60_000,
        open_time=np.asarray([int(r[0]) for r in rows], dtype=np.int64),
        open=[r[1] for r in rows],
        high=[r[2] for r in rows],
        low=[r[3] for r in rows],
        close=close,
        volume=[r[5] for r in rows],
        close_units=np.asarray([int(Decimal(c) * 10**8) for c in close], dtype=np.int64),
    )


SYMBOLS = {"BTCUSDT": ("BTC", "USDT"), "ETHUSDT": ("ETH", "USDT")}


@pytest.mark.parametrize(
    ("fill", "cash", "params"),
    [
        (FillSettings(), "700", SmaCrossParams(qty=Decimal("0.002"))),
        (FillSettings(fee_in_quote=True, slippage_bps=Decimal("3")), "700", SmaCrossParams()),
        # a volume cap that splits market orders over several candles
        (FillSettings(volume_share=Decimal("0.0005")), "100000", SmaCrossParams(qty=Decimal("1"))),
        # latency beyond a candle: orders reach the book a candle later
        (FillSettings(latency_ms=90_000), "700", SmaCrossParams(fast=5, slow=20)),
        # too little cash for some entries: rejections
        (FillSettings(), "150", SmaCrossParams(qty=Decimal("0.002"))),
    ],
)
def test_columnar_run_equals_the_candle_by_candle_run(fill, cash, params):
    data = {s: bars(s, 6000) for s in SYMBOLS}
    event = Backtester(SmaCross(params), SYMBOLS, cash=Decimal(cash), fill=fill)
    a = event.run({s: b.candles() for s, b in data.items()})
    columnar = Backtester(SmaCross(params), SYMBOLS, cash=Decimal(cash), fill=fill)
    b = columnar.run_columnar(data)
    assert len(a.fills) > 20
    assert_same_run(b, a)
    if cash == "150":
        assert a.rejected  # the case really had rejections


def assert_same_run(b: BacktestResult, a: BacktestResult) -> None:
    """Run ``b`` is run ``a``: fills, equity curve, portfolio, rejections, order states."""
    assert b.fills == a.fills
    assert b.equity.times == a.equity.times
    assert b.equity.equity == a.equity.equity
    assert b.equity.positions == a.equity.positions
    assert b.equity.prices == a.equity.prices
    assert b.portfolio.balances == a.portfolio.balances
    assert b.portfolio.realised() == a.portfolio.realised()
    assert b.portfolio.unrealised() == a.portfolio.unrealised()
    assert [r.client_order_id for r in b.rejected] == [r.client_order_id for r in a.rejected]
    assert {k: v.status for k, v in b.orders.items()} == {k: v.status for k, v in a.orders.items()}
    assert b.levels == a.levels
    assert b.candles == a.candles and b.first_open == a.first_open
    assert performance.compute(b) == performance.compute(a)  # the metrics to the last digit


def test_no_decisions_on_candles_of_another_interval():
    data = bars("BTCUSDT", 3000)
    assert SmaCross(SmaCrossParams(interval="15m")).decision_bars(data).any() == False  # noqa: E712
    assert SmaCross().decision_bars(data).any()


def test_decision_bars_are_where_on_candle_can_act():
    data = bars("BTCUSDT", 3000)
    s = SmaCross(SmaCrossParams(fast=7, slow=25))
    marks = s.decision_bars(data)
    probe = SmaCross(SmaCrossParams(fast=7, slow=25))
    seen = []
    for i, c in enumerate(data.candles()):
        st = probe._st(c.symbol)
        before = st.prev
        probe.on_candle(c)
        after = st.prev
        if before is not None and after is not None and before * after < 0:
            seen.append((i, 1 if after > 0 else -1))
    assert [(int(i), int(marks[i])) for i in np.flatnonzero(marks)] == seen
    assert len(seen) > 50
