"""``sma-cross`` through the kernel's backtester equals backtesting.py, trade for trade.

backtesting.py runs its ``SmaCross`` example, long only, configured as ours: commission
0.001 of the notional on entry and on exit (charged in cash, so ours charges fees in the
quote asset), no spread, market orders filled at the next bar's open
(``trade_on_close=False``). On a month of real 1m candles the two give the same trades
(bars, prices, quantities) and the same final equity, to 1e-9 relative.

Two things are pinned so that the comparison is of the engines, not of float noise:
the SMAs given to backtesting.py are exact (float of the exact mean), because a float
rolling mean decides exact ties (fast == slow to the last digit, which 2-decimal prices
do hit) by rounding noise, either way, where ours compares exact sums; and quantities are
whole units on a cash balance that never limits them, because backtesting.py trades whole
units only (its ``FractionalBacktest`` scales prices, which brings the noise back).
Everything else is backtesting.py's own: ``crossover``, the order handling, the broker's
commission and equity.
"""

from __future__ import annotations

import gzip
import warnings
from decimal import Decimal
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from backtesting import Backtest, Strategy
from backtesting.lib import crossover

from gridstream.common.messages import Candle
from gridstream.core.backtest import FillSettings, run_backtest
from gridstream.core.strategies.sma_cross import SmaCross, SmaCrossParams

REPO = Path(__file__).resolve().parents[3]


def load(symbol: str) -> list[Candle]:
    path = REPO / "data" / "klines" / f"{symbol}-1m.csv.gz"
    out = []
    with gzip.open(path, "rt") as fh:
        next(fh)
        for line in fh:
            f = line.rstrip("\n").split(",")
            t = int(f[0])
            out.append(
                Candle(
                    id=f"c:{symbol}:{t}",
                    ts_event=(t + 60_000) * 1_000_000,
                    ts_init=(t + 60_000) * 1_000_000,
                    symbol=symbol,
                    interval="1m",
                    open_time=t,
                    close_time=t + 59_999,
                    open=Decimal(f[1]),
                    high=Decimal(f[2]),
                    low=Decimal(f[3]),
                    close=Decimal(f[4]),
                    volume=Decimal(f[5]),
                    source="file",
                )
            )
    return out


def exact_sma(closes: list[Decimal], n: int) -> np.ndarray:
    """The SMA from exact sums (as float): pandas' rolling mean of floats decides exact
    ties (fast == slow to the last digit) by rounding noise, either way."""
    out = np.full(len(closes), np.nan)
    total = Decimal(0)
    for i, c in enumerate(closes):
        total += c
        if i >= n:
            total -= closes[i - n]
        if i >= n - 1:
            out[i] = float(total / n)
    return out


def reference(candles: list[Candle], fast: int, slow: int, qty: float, cash: float):
    df = pd.DataFrame(
        {
            "Open": [float(c.open) for c in candles],
            "High": [float(c.high) for c in candles],
            "Low": [float(c.low) for c in candles],
            "Close": [float(c.close) for c in candles],
            "Volume": [float(c.volume) for c in candles],
        },
        index=pd.to_datetime([c.open_time for c in candles], unit="ms"),
    )
    units = int(qty)
    assert units == qty, "backtesting.py trades whole units (see the module docstring)"

    closes = [c.close for c in candles]
    fast_sma, slow_sma = exact_sma(closes, fast), exact_sma(closes, slow)

    class LongSmaCross(Strategy):
        def init(self) -> None:
            self.fast = self.I(lambda: fast_sma, name=f"sma{fast}")
            self.slow = self.I(lambda: slow_sma, name=f"sma{slow}")

        def next(self) -> None:
            if crossover(self.fast, self.slow) and not self.position:
                self.buy(size=units)
            elif crossover(self.slow, self.fast) and self.position:
                self.position.close()

    bt = Backtest(
        df,
        LongSmaCross,
        cash=cash,
        commission=0.001,
        trade_on_close=False,
        finalize_trades=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bt.run()


@pytest.mark.parametrize(
    ("symbol", "fast", "slow", "qty"),
    [
        ("BTCUSDT", 10, 30, "1"),
        ("ETHUSDT", 10, 30, "2"),
        ("SOLUSDT", 10, 30, "5"),
        ("BTCUSDT", 7, 25, "1"),
    ],
)
def test_same_trades_and_final_equity_as_backtesting_py(symbol, fast, slow, qty):
    candles = load(symbol)
    cash = Decimal(1_000_000)
    ours = run_backtest(
        SmaCross(SmaCrossParams(fast=fast, slow=slow, qty=Decimal(qty))),
        {symbol: candles},
        {symbol: (symbol[:-4], "USDT")},
        cash=cash,
        fill=FillSettings(
            maker_fee=Decimal("0.001"), taker_fee=Decimal("0.001"), fee_in_quote=True
        ),
    )
    ref = reference(candles, fast, slow, float(qty), float(cash))
    trades = ref["_trades"]
    bar_of = {c.open_time: i for i, c in enumerate(candles)}
    got = [(bar_of[f.time_ms], f.side, f.price, f.qty) for f in ours.fills]
    want = []
    for row in trades.itertuples():
        want.append((int(row.EntryBar), "BUY", row.EntryPrice, row.Size))
        if not np.isnan(row.ExitPrice):
            want.append((int(row.ExitBar), "SELL", row.ExitPrice, row.Size))
    # a trade still open at the end is not among the closed ones (finalize_trades=False)
    for tr in ref["_strategy"].trades:
        want.append((int(tr.entry_bar), "BUY", tr.entry_price, tr.size))
    assert len(want) > 40, "too few trades to mean anything"
    assert len(got) == len(want)
    for (gb, gs, gp, gq), (wb, ws, wp, wq) in zip(got, want, strict=True):
        assert (gb, gs) == (wb, ws)
        assert float(gp) == pytest.approx(wp, rel=1e-9)
        assert float(gq) == pytest.approx(wq, rel=1e-9)
    final = float(ours.equity[-1].equity)
    assert final == pytest.approx(ref["Equity Final [$]"], rel=1e-9)
    assert final != float(cash)  # it traded
