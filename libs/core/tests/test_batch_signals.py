"""Signals made at once for a backtest equal the engine's, and so do the runs they drive.

:class:`~gridstream.core.signals.batch.BatchSignals` answers ``on_candle`` from columns
computed before the run. What a strategy decides on (``ema``, ``atr``, ``regime``) must be
the engine's to the bit, and the grid run it drives must give the very fills, equity and
portfolio of the run with the candle-by-candle engine.
"""

from __future__ import annotations

from decimal import Decimal

import pytest

from gridstream.core.backtest import Backtester, FillSettings
from gridstream.core.signals.batch import BatchSignals, SeriesColumns
from gridstream.core.signals.engine import SignalEngine, SignalParams
from gridstream.core.strategies.grid import GridEngine, GridParams

from .test_columnar import bars

PAIRS = ("BTCUSDT", "ETHUSDT", "SOLUSDT", "XRPUSDT", "BNBUSDT")


@pytest.mark.parametrize("symbol", PAIRS)
def test_batch_signals_equal_the_engine(symbol):
    b = bars(symbol, 20_000)
    batch = BatchSignals({symbol: SeriesColumns.of_bars(b)})
    assert batch.by_engine == []  # the guard did not trip on real data
    engine = SignalEngine()
    n = 0
    for c in b.candles():
        want, got = engine.on_candle(c), batch.on_candle(c)
        assert len(got) == len(want)
        for w, g in zip(want, got, strict=True):
            n += 1
            assert (g.id, g.open_time, g.close, g.regime) == (w.id, w.open_time, w.close, w.regime)
            # bit-equal: what the grid decides on
            assert g.ema == w.ema and g.atr == w.atr
            for k, v in w.values.items():
                assert g.values[k] == pytest.approx(v, rel=1e-9, abs=1e-9, nan_ok=True)
    assert n == len(b) - engine.warmup + 1


def test_the_guard_computes_a_doubtful_series_with_the_engine():
    b = bars("BTCUSDT", 3000)
    cols = SeriesColumns.of_bars(b)
    plain = BatchSignals({"BTCUSDT": cols})
    # thresholds right on a value the series takes: a comparison rounding could flip
    adx = plain.on_candle_values("BTCUSDT", 2000)["adx"]
    p = SignalParams(adx_enter=adx, adx_exit=adx)
    doubtful = BatchSignals({"BTCUSDT": cols}, p)
    assert doubtful.by_engine == ["BTCUSDT"]
    engine = SignalEngine(p)
    for c in b.candles():
        want, got = engine.on_candle(c), doubtful.on_candle(c)
        assert [(s.regime, s.ema, s.atr, s.values) for s in got] == [
            (s.regime, s.ema, s.atr, s.values) for s in want
        ]


SYMBOLS = {"BTCUSDT": ("BTC", "USDT"), "ETHUSDT": ("ETH", "USDT")}


@pytest.mark.parametrize(
    "fill",
    [
        FillSettings(),
        FillSettings(queue="through", latency_ms=30_000, volume_share=Decimal("0.01")),
    ],
)
def test_a_grid_run_on_batch_signals_equals_the_engine_run(fill):
    data = {s: bars(s, 12_000) for s in SYMBOLS}
    params = GridParams(order_quote=Decimal("50"))
    a = Backtester(GridEngine(params), SYMBOLS, cash=Decimal(2000), fill=fill).run(
        {s: b.candles() for s, b in data.items()}
    )
    batch = BatchSignals({s: SeriesColumns.of_bars(b) for s, b in data.items()})
    b = Backtester(GridEngine(params), SYMBOLS, cash=Decimal(2000), fill=fill, signals=batch).run(
        {s: v.candles() for s, v in data.items()}
    )
    assert len(a.fills) > 100
    assert b.fills == a.fills
    assert b.equity.times == a.equity.times
    assert b.equity.equity == a.equity.equity
    assert b.equity.positions == a.equity.positions
    assert b.portfolio.balances == a.portfolio.balances
    assert b.levels == a.levels
    assert [r.client_order_id for r in b.rejected] == [r.client_order_id for r in a.rejected]


@pytest.mark.parametrize(
    "fill",
    [
        FillSettings(),
        FillSettings(queue="through", volume_share=Decimal("0.001")),
        FillSettings(latency_ms=30_000, fee_in_quote=True),
    ],
)
def test_skipping_quiet_bars_changes_no_fill(fill, monkeypatch):
    """A bar that fills nothing skips the vertex walk (``_quiet``): the same run with the
    walk on every bar gives the very same fills and equity."""
    import gridstream.core.backtest as bt

    data = {s: bars(s, 8_000) for s in SYMBOLS}
    params = GridParams(order_quote=Decimal("50"))

    def run() -> object:
        batch = BatchSignals({s: SeriesColumns.of_bars(b) for s, b in data.items()})
        return Backtester(
            GridEngine(params), SYMBOLS, cash=Decimal(2000), fill=fill, signals=batch
        ).run({s: v.candles() for s, v in data.items()})

    a = run()
    monkeypatch.setattr(bt, "_quiet", lambda *_a: False)
    b = run()
    assert len(a.fills) > 50
    assert b.fills == a.fills
    assert b.equity.equity == a.equity.equity
    assert b.portfolio.balances == a.portfolio.balances
