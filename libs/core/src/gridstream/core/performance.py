"""Performance figures of a backtest (analytics: floats are fine here).

Definitions (``metrics.json`` keys; ``E_i`` is equity at the close of bar ``i``, ``r_i =
E_i / E_{i-1} - 1`` the per-bar return, ``N = 365.25 x 86,400,000 / interval_ms`` bars
per year, no risk-free rate):

* ``total_return`` = ``E_end / E_start - 1``; ``cagr`` = ``(E_end / E_start) ** (1 /
  years) - 1`` with ``years`` = (last close - first open) / 365.25 days.
* ``sharpe`` = ``mean(r) / stdev(r) x sqrt(N)`` (sample stdev); ``sortino`` =
  ``mean(r) / sqrt(mean(min(r, 0)^2)) x sqrt(N)``.
* ``max_drawdown`` = ``max(1 - E_i / max(E_0..E_i))``, a positive fraction;
  ``max_drawdown_duration_ms`` the longest time from a peak to the first equity back at
  or above it (or to the end); ``calmar`` = ``cagr / max_drawdown``.
* Round trips: sells matched against earlier buys of the symbol, first in first out;
  each matched quantity is one part of a round trip, and a sell that closes some
  quantity is one round trip. ``win_rate`` = share of round trips with a positive
  result (after both fills' fees, pro rata); ``profit_factor`` = gross wins / gross
  losses.
* ``exposure`` = share of bars that ended with a position; ``turnover`` = quote notional
  traded / starting equity; ``fees`` in the quote asset (base fees at the fill price).
* ``grid_profit`` = profit realised by round trips (average cost, before fees);
  ``inventory_pnl`` = mark-to-market result of what is still held; so that
  ``E_end - E_start = grid_profit + inventory_pnl - fees``.
* ``buy_and_hold``: the starting cash split equally over the symbols, each bought at its
  first open with the taker fee and held to its last close: ``total_return``, ``cagr``,
  ``sharpe``, ``max_drawdown``, ``final_equity``.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from collections.abc import Sequence
from decimal import Decimal
from typing import Any, Final

import numpy as np

from gridstream.core.backtest import BacktestResult, Fill

YEAR_MS = 365.25 * 86_400_000
#: The headline figures, in the order tables and reports show them (keys of compute()).
HEADLINE: Final = (
    "total_return",
    "cagr",
    "sharpe",
    "sortino",
    "calmar",
    "max_drawdown",
    "max_drawdown_duration_ms",
    "win_rate",
    "profit_factor",
    "exposure",
    "turnover",
    "fees",
    "round_trips",
    "grid_profit",
    "inventory_pnl",
    "final_equity",
)


def _returns(equity: np.ndarray) -> np.ndarray:
    prev = equity[:-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        r = equity[1:] / prev - 1
    kept: np.ndarray = r[prev != 0]
    return kept


def sharpe(returns: np.ndarray, per_year: float) -> float:
    if len(returns) < 2:
        return 0.0
    sd = float(np.std(returns, ddof=1))
    return float(np.mean(returns)) / sd * math.sqrt(per_year) if sd > 0 else 0.0


def sortino(returns: np.ndarray, per_year: float) -> float:
    if len(returns) < 2:
        return 0.0
    down = math.sqrt(float(np.mean(np.minimum(returns, 0.0) ** 2)))
    return float(np.mean(returns)) / down * math.sqrt(per_year) if down > 0 else 0.0


def drawdown(times: np.ndarray, equity: np.ndarray) -> tuple[float, int, np.ndarray]:
    """(max drawdown, its longest duration in ms, the drawdown series)."""
    if len(equity) == 0:
        return 0.0, 0, np.zeros(0)
    peak = np.maximum.accumulate(equity)
    with np.errstate(divide="ignore", invalid="ignore"):
        series = np.where(peak > 0, 1 - equity / peak, 0.0)
    before = np.concatenate(([-np.inf], peak[:-1]))
    peak_times = times[equity >= before]  # every new (or equal) high
    gaps = np.diff(np.concatenate((peak_times, [times[-1]])))
    longest = int(gaps.max()) if len(gaps) else 0
    return float(series.max()), longest, series


def cagr(start: float, end: float, years: float) -> float:
    if start <= 0 or years <= 0 or end <= 0:
        return 0.0
    return float((end / start) ** (1 / years) - 1)


def round_trips(fills: Sequence[Fill], quote_of: dict[str, str]) -> list[float]:
    """Net result of each round trip (FIFO), fees pro rata, in the quote asset."""
    lots: dict[str, deque[list[Decimal]]] = {}
    out: list[float] = []
    for f in fills:
        fee_q = f.fee if f.fee_asset == quote_of[f.symbol] else f.fee * f.price
        if f.side == "BUY":
            # a fee paid in the base asset leaves less held: the lot is what is held
            held = f.qty if f.fee_asset == quote_of[f.symbol] else f.qty - f.fee
            if held > 0:
                lots.setdefault(f.symbol, deque()).append([held, f.price, fee_q / held])
            continue
        book = lots.setdefault(f.symbol, deque())
        left = f.qty
        result = Decimal(0)
        matched = False
        while left > 0 and book:
            lot = book[0]
            take = min(left, lot[0])
            result += (f.price - lot[1]) * take - lot[2] * take - fee_q * take / f.qty
            lot[0] -= take
            left -= take
            matched = True
            if lot[0] <= 0:
                book.popleft()
        if matched:
            out.append(float(result))
    return out


def compute(result: BacktestResult) -> dict[str, Any]:
    """Every figure of ``metrics.json`` (see the module docstring)."""
    curve = result.equity
    times = np.asarray(curve.times, dtype=np.int64)
    eq = curve.equity_floats()
    start = float(result.start_cash)
    end = float(eq[-1]) if len(eq) else start
    per_year = YEAR_MS / result.interval_ms
    span_ms = int(times[-1] + 1 - (times[0] + 1 - result.interval_ms)) if len(times) else 0
    years = span_ms / YEAR_MS
    rets = _returns(np.concatenate(([start], eq)))
    mdd, mdd_ms, _series = drawdown(times, eq)
    c = cagr(start, end, years)
    pf = result.portfolio
    quote_of = {s: pf.positions[s].quote for s in result.symbols}
    trips = round_trips(result.fills, quote_of)
    wins = [t for t in trips if t > 0]
    losses = [-t for t in trips if t < 0]
    exposure = float(curve.held().mean()) if len(times) else 0.0
    return {
        "start_equity": start,
        "final_equity": end,
        "total_return": end / start - 1 if start else 0.0,
        "cagr": c,
        "sharpe": sharpe(rets, per_year),
        "sortino": sortino(rets, per_year),
        "calmar": c / mdd if mdd > 0 else 0.0,
        "max_drawdown": mdd,
        "max_drawdown_duration_ms": mdd_ms,
        "win_rate": len(wins) / len(trips) if trips else 0.0,
        "profit_factor": (sum(wins) / sum(losses)) if losses else (math.inf if wins else 0.0),
        "exposure": exposure,
        "turnover": float(pf.turnover()) / start if start else 0.0,
        "fees": float(pf.fees()),
        "round_trips": len(trips),
        "fills": len(result.fills),
        "rejected_orders": len(result.rejected),
        "rejections": dict(sorted(Counter(r.reason for r in result.rejected).items())),
        "grid_profit": float(pf.realised()),
        "inventory_pnl": float(pf.unrealised()),
        "bars": len(times),
        "candles": result.candles,
        "interval_ms": result.interval_ms,
        "years": years,
        "buy_and_hold": buy_and_hold(result, per_year, years, times),
    }


def buy_and_hold(
    result: BacktestResult, per_year: float, years: float, times: np.ndarray | None = None
) -> dict[str, Any]:
    """The same cash split equally, each symbol bought at its first open and held
    (``times``: the curve's times as an array, when the caller has them)."""
    curve = result.equity
    symbols = [s for s in result.symbols if s in result.first_open]
    if not symbols or not len(curve):
        return {}
    cash = float(result.start_cash) / len(symbols)
    eq = np.zeros(len(curve), dtype=np.float64)
    for s in symbols:
        fee = float(result.fill_settings.fees(s)[1])
        qty = cash / (float(result.first_open[s]) * (1 + fee))
        px = curve.price_floats(result.symbols.index(s))
        # before a symbol's first candle its share is still cash
        eq += np.where(np.isnan(px), cash, qty * px)
    start = float(result.start_cash)
    end = float(eq[-1])
    if times is None:
        times = np.asarray(curve.times, dtype=np.int64)
    mdd, _, _ = drawdown(times, eq)
    return {
        "total_return": end / start - 1,
        "cagr": cagr(start, end, years),
        "sharpe": sharpe(_returns(np.concatenate(([start], eq))), per_year),
        "max_drawdown": mdd,
        "final_equity": end,
    }
