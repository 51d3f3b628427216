"""The grid's skipping run equals its candle-by-candle run, fill for fill.

``Backtester.run_skipping`` steps a symbol's candle through the engines only where the
grid may decide (``GridEngine.next_busy``, a proof over the signals known in advance) or
where the candle's range reaches one of its orders. On real candles of five pairs, under
the settings that change what the grid wants and how its orders fill, it must give the
very fills, rejections, equity curve and portfolio of ``Backtester.run``, and it must
skip most candles (else it proves nothing).
"""

from __future__ import annotations

from decimal import Decimal

import numpy as np
import pytest

from gridstream.common.binance.filters import SymbolFilters
from gridstream.common.messages import OrderFilled
from gridstream.core.backtest import Backtester, FillSettings
from gridstream.core.risk import RiskEngine
from gridstream.core.signals.batch import BatchSignals, SeriesColumns
from gridstream.core.strategies import grid_scan
from gridstream.core.strategies.grid import GridEngine, GridParams

from .test_columnar import assert_same_run, bars

SYMBOLS = {s: (s[:-4], "USDT") for s in ("BTCUSDT", "ETHUSDT", "BNBUSDT", "SOLUSDT", "XRPUSDT")}
N = 5000

CASES = [
    pytest.param(GridParams(), FillSettings(), "10000000", None, 0.2, id="defaults"),
    pytest.param(
        GridParams(levels=5, tolerance=Decimal("0.3"), atr_mult=Decimal("1.5")),
        FillSettings(queue="through", latency_ms=20_000),
        "700",
        None,
        None,
        id="through-latency-small-cash",
    ),
    pytest.param(
        GridParams(levels=2, tolerance=Decimal("1"), min_spacing_bps=Decimal("10")),
        FillSettings(volume_share=Decimal("0.001"), fee_in_quote=True),
        "300",
        None,
        None,
        id="volume-cap-fee-in-quote",
    ),
    pytest.param(
        GridParams(tolerance=Decimal("0"), order_quote=Decimal("15")),
        FillSettings(),
        "700",
        Decimal("120"),
        None,
        id="no-tolerance-risk",
    ),
]


@pytest.mark.parametrize(("params", "fill", "cash", "exposure", "most_stepped"), CASES)
def test_skipping_run_equals_the_candle_by_candle_run(params, fill, cash, exposure, most_stepped):
    data = {s: bars(s, N) for s in SYMBOLS}

    def backtester() -> Backtester:
        risk = None
        if exposure is not None:
            rules = {s: SymbolFilters(symbol=s) for s in SYMBOLS}
            risk = RiskEngine(rules, max_exposure_quote=exposure)
        signals = BatchSignals({s: SeriesColumns.of_bars(b) for s, b in data.items()})
        return Backtester(
            GridEngine(params), SYMBOLS, cash=Decimal(cash), fill=fill, signals=signals, risk=risk
        )

    event = backtester()
    a = event.run({s: b.candles() for s, b in data.items()})
    skipping = backtester()
    stepped: list[int] = []
    fills_in = skipping._fills_in

    def counted(c):  # type: ignore[no-untyped-def]
        stepped.append(c.open_time)
        return fills_in(c)

    skipping._fills_in = counted  # type: ignore[method-assign]
    b = skipping.run_skipping(data)
    assert len(a.fills) > 100
    assert_same_run(b, a)
    if most_stepped is not None:  # it skips (with too little cash the grid retries a lot)
        assert len(stepped) < most_stepped * N * len(SYMBOLS)


@pytest.mark.parametrize("inventory", ["0", "0.0123", "1000"])
def test_the_plan_is_the_engines_grid_on_every_candle(inventory):
    """Wherever the state-free plan claims to know the wanted grid (mode GRID), it is the
    engine's own grid, level for level, for the inventory the engine holds."""
    b = bars("ETHUSDT", 3000)
    signals = BatchSignals({"ETHUSDT": SeriesColumns.of_bars(b)})
    params = GridParams(levels=4, order_quote=Decimal("25"))
    engine = GridEngine(params)
    if inventory != "0":
        engine.on_filled(
            OrderFilled(
                id="f1",
                ts_event=0,
                ts_init=0,
                symbol="ETHUSDT",
                client_order_id="x",
                venue_order_id="x",
                trade_id="1",
                side="BUY",
                price=Decimal("1"),
                qty=Decimal(inventory),
                fee=Decimal(0),
                fee_asset="ETH",
                liquidity="maker",
            )
        )
    plan = grid_scan.plan(params, "ETHUSDT", signals.columns("ETHUSDT"), b.close_units, 8)
    assert plan is not None
    tick, step = params.tick("ETHUSDT"), params.step("ETHUSDT")
    available = int(Decimal(inventory) / step)
    checked = 0
    for i in range(len(b)):
        if plan.mode[i] != grid_scan.MODE_GRID:
            continue
        (sig,) = signals.signal_at(b.candle(i), i)
        grid = engine.grid(sig)
        assert int(grid.spacing / tick) == plan.spacing[i]
        buys = [int(lv.price / tick) for lv in grid.levels if lv.side == "BUY"]
        assert buys == plan.buys[: plan.buy_count[i], i].tolist()
        sells = [int(lv.price / tick) for lv in grid.levels if lv.side == "SELL"]
        kept = int(np.sum(plan.sell_cum[: plan.sell_count[i], i] <= available))
        assert sells == plan.sells[:kept, i].tolist()
        checked += 1
    assert checked > 2000


def test_both_column_runs_report_progress_up_to_every_candle():
    """A long run shows a progress bar: the skipping and the columnar runs tell it how
    many candles they passed, in steps, adding up to every candle of every symbol."""
    from gridstream.core.strategies.sma_cross import SmaCross

    data = {s: bars(s, 30_000) for s in ("BTCUSDT", "ETHUSDT")}
    syms = {s: SYMBOLS[s] for s in data}
    for run in ("skipping", "columnar"):
        told: list[int] = []
        if run == "skipping":
            signals = BatchSignals({s: SeriesColumns.of_bars(b) for s, b in data.items()})
            bt = Backtester(GridEngine(), syms, cash=Decimal(700), signals=signals)
            bt.run_skipping(data, told.append)
        else:
            Backtester(SmaCross(), syms, cash=Decimal(700)).run_columnar(data, told.append)
        assert sum(told) == 60_000, run
        assert len(told) >= 3 and all(t >= 10_000 for t in told[:-1]), (run, told)
