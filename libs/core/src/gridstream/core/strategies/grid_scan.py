"""The grid's decisions over whole columns: on which candles it provably decides nothing.

A backtest that knows every signal in advance need not step a candle through the engine
when the engine would do nothing there. For the grid that is a candle where the signal's
wanted grid (:meth:`GridEngine.grid <gridstream.core.strategies.grid.GridEngine.grid>`)
is already matched, level for level, by the live orders, so that ``_decide`` returns no
intent. :func:`plan` computes, once per series, every part of the wanted grid that does
not depend on the engine's state (centre and spacing in ticks, the wanted buy levels, the
sell levels and their cumulative quantities in steps); :func:`next_busy` then scans from a
candle on, for the engine's state now (its live orders, its base inventory), to the first
candle where it may act.

Only a proof of *nothing* is made here; every decision is still the engine's own. The
proof is sufficient, not necessary: a candle it cannot prove idle is stepped through the
engine, which decides as always (a test holds the skipping run equal to the candle by
candle run, fill for fill). In particular:

* the centre is ``round_half_even(ema / tick)``, computed in floats: a candle whose
  ``ema / tick`` is within :data:`GUARD` of a half (or the ATR term of the spacing within
  :data:`GUARD` of a whole number of ticks) is not proved idle;
* the close-based terms of the spacing and every quantity are exact integer arithmetic
  (the Decimal engine's results, to the step);
* the matching is the engine's own, transcribed: each wanted level in turn takes the
  nearest unused live order of its side within the tolerance (the first of equals, in
  the engine's order); the candle is idle when every level finds one and no live order
  is left over.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Final

import numpy as np
import numpy.typing as npt
from numba import njit

if TYPE_CHECKING:
    from gridstream.core.signals.batch import SignalColumns
    from gridstream.core.strategies.grid import GridParams

#: How near a rounding boundary a float may come before the candle is left to the engine
#: (in ticks). The floats are within ~3e-16 x value of the Decimal values, under 1e-7
#: tick below :data:`_MAX_TICKS`.
GUARD: Final = 1e-6
#: No skipping at or beyond this many ticks (float exactness, int64 room).
_MAX_TICKS: Final = 2**28

#: What a candle's signal leaves the engine to do (:attr:`GridPlan.mode`).
MODE_NONE: Final = 0  # no signal, or warming up: nothing
MODE_HALT: Final = 1  # high volatility: cancel every live order
MODE_GRID: Final = 2  # a grid: the proof of :func:`next_busy` applies
MODE_UNSURE: Final = 3  # a float near a rounding boundary: the engine decides

Ints = npt.NDArray[np.int64]


@dataclass(frozen=True)
class GridPlan:
    """The state-free part of one series' wanted grids (see :func:`plan`)."""

    mode: npt.NDArray[np.int8]
    spacing: Ints
    #: ``buys[k, j]``: the k-th wanted buy of candle ``j`` in ticks (nearest first)
    buy_count: Ints
    buys: Ints
    #: ``sells[k, j]``: the k-th sell level of candle ``j`` that rests above the close with
    #: a quantity, in ticks (nearest first); ``sell_cum[k, j]``: the quantity in steps of
    #: the first ``k + 1`` of them (the engine keeps the prefix its inventory covers)
    sell_count: Ints
    sells: Ints
    sell_cum: Ints
    tolerance: tuple[int, int]


def _ratio(d: Decimal) -> tuple[int, int]:
    n, q = d.as_integer_ratio()
    return int(n), int(q)


def plan(
    params: GridParams,
    symbol: str,
    signals: SignalColumns,
    close_units: Ints,
    places: int,
) -> GridPlan | None:
    """The wanted grids of one series, or None when its prices do not fit the proof
    (a tick that is not a whole number of ``10**-places``, or prices too large)."""
    tick, step = params.tick(symbol), params.step(symbol)
    tick_units = tick * Decimal(10) ** places
    if tick_units != tick_units.to_integral_value() or not len(close_units):
        return None
    tu = int(tick_units)
    close = close_units.astype(np.int64)
    if int(close.max()) >= _MAX_TICKS * tu:
        return None
    n = len(close)
    levels = params.levels
    # -- centre: round half even of ema / tick ------------------------------------------
    x = signals.ema / float(tick)
    finite = np.isfinite(x) & (np.abs(x) < _MAX_TICKS)
    x = np.where(finite, x, 0.0)
    centre = np.rint(x).astype(np.int64)  # numpy rounds half to even, as the engine
    unsure = ~finite | (np.abs(x - np.floor(x) - 0.5) < GUARD)
    # -- spacing: the largest term, each rounded up to a tick ---------------------------
    atr = np.where(np.isfinite(signals.atr), signals.atr, 0.0)
    y = float(params.atr_mult) * atr / float(tick)
    y_ok = y < _MAX_TICKS
    y = np.where(y_ok, y, 0.0)
    unsure |= ~y_ok | ((y != 0) & (np.abs(y - np.rint(y)) < GUARD))
    atr_ticks = np.ceil(y).astype(np.int64)
    mn, md = _ratio(params.min_spacing_bps)
    fn, fd = _ratio(params.fee_bps)
    if max(mn, 2 * fn) * int(close.max()) >= 2**62:
        return None
    min_ticks = -((-close * mn) // (md * 10_000 * tu))
    fee_ticks = -((-close * (2 * fn)) // (fd * 10_000 * tu)) + 1
    spacing = np.maximum(np.maximum(atr_ticks, min_ticks), fee_ticks)
    # -- levels: prices in ticks, quantities in steps ------------------------------------
    # qty = floor(order_quote / (price_ticks * tick) / step) = qn // (qd * price_ticks)
    qn, qd = _ratio(params.order_quote / (tick * step))
    if qn >= 2**62 or qd * (_MAX_TICKS * 2 * (levels + 1)) >= 2**62:
        return None
    idx = np.arange(1, levels + 1, dtype=np.int64)[:, None]
    buy = centre[None, :] - idx * spacing[None, :]
    buy_ok = (buy > 0) & (buy * tu < close[None, :]) & (buy * qd <= qn)
    sell = centre[None, :] + idx * spacing[None, :]
    sell_qty = np.where(sell > 0, qn // np.maximum(qd * sell, 1), 0)
    sell_ok = (sell * tu > close[None, :]) & (sell_qty > 0)
    buys, buy_count = _pack(buy, buy_ok, n, levels)
    sells, sell_count = _pack(sell, sell_ok, n, levels)
    qty_packed, _ = _pack(sell_qty, sell_ok, n, levels)
    sell_cum = np.cumsum(qty_packed, axis=0)
    mode = np.full(n, MODE_GRID, dtype=np.int8)
    mode[unsure] = MODE_UNSURE
    regime = signals.regime
    from gridstream.core.signals.batch import REGIMES

    mode[regime == REGIMES.index("high_volatility")] = MODE_HALT
    mode[(regime == REGIMES.index("warmup")) | ~signals.has_signal] = MODE_NONE
    return GridPlan(
        mode=mode,
        spacing=spacing,
        buy_count=buy_count,
        buys=np.ascontiguousarray(buys),
        sell_count=sell_count,
        sells=np.ascontiguousarray(sells),
        sell_cum=np.ascontiguousarray(sell_cum),
        tolerance=_ratio(params.tolerance),
    )


def _pack(values: Ints, ok: npt.NDArray[np.bool_], n: int, levels: int) -> tuple[Ints, Ints]:
    """The ``ok`` entries of each column of ``values`` moved to its top, in level order,
    and their count per column."""
    rank = np.cumsum(ok, axis=0) - 1
    rows, cols = np.nonzero(ok)
    out = np.zeros((levels, n), dtype=np.int64)
    out[rank[rows, cols], cols] = values[rows, cols]
    return out, ok.sum(axis=0).astype(np.int64)


@njit(cache=True, nogil=True)
def _unmatched(
    wanted: Ints,
    count: int,
    j: int,
    live: Ints,
    side: npt.NDArray[np.bool_],
    want_side: bool,
    used: npt.NDArray[np.bool_],
    s: int,
    tol_n: int,
    tol_d: int,
) -> bool:  # pragma: no cover - compiled
    """True when a wanted level of one side finds no live order (the engine's matching:
    each level in turn takes the nearest unused live order of its side within the
    tolerance, the first of equals)."""
    for k in range(count):
        w = wanted[k, j]
        best = -1
        best_d = 0
        for m in range(len(live)):
            if used[m] or side[m] != want_side:
                continue
            d = abs(live[m] - w)
            if d * tol_d <= tol_n * s and (best < 0 or d < best_d):
                best = m
                best_d = d
        if best < 0:
            return True
        used[best] = True
    return False


@njit(cache=True, nogil=True)
def _scan(
    start: int,
    stop: int,
    mode: npt.NDArray[np.int8],
    spacing: Ints,
    buy_count: Ints,
    buys: Ints,
    sell_count: Ints,
    sells: Ints,
    sell_cum: Ints,
    tol_n: int,
    tol_d: int,
    live: Ints,
    is_buy: npt.NDArray[np.bool_],
    available: int,
) -> int:  # pragma: no cover - compiled
    n_live = len(live)
    n_buy = 0
    for m in range(n_live):
        if is_buy[m]:
            n_buy += 1
    used = np.zeros(n_live, dtype=np.bool_)
    for j in range(start, stop):
        mo = mode[j]
        if mo == 0:
            continue
        if mo == 1:
            if n_live:
                return j
            continue
        if mo == 3:
            return j
        want_sells = 0
        for k in range(sell_count[j]):
            if sell_cum[k, j] > available:
                break
            want_sells += 1
        # every live order must match a wanted level: as many of each side as wanted
        if buy_count[j] != n_buy or want_sells != n_live - n_buy:
            return j
        s = spacing[j]
        used[:] = False
        if _unmatched(buys, buy_count[j], j, live, is_buy, True, used, s, tol_n, tol_d):
            return j
        if _unmatched(sells, want_sells, j, live, is_buy, False, used, s, tol_n, tol_d):
            return j
    return stop


def next_busy(
    p: GridPlan,
    start: int,
    stop: int,
    live: Ints,
    is_buy: npt.NDArray[np.bool_],
    available_steps: int,
) -> int:
    """The first candle in ``[start, stop)`` where the engine, holding these live orders
    (prices in ticks, in the engine's order) and this inventory (in steps), may decide
    something; ``stop`` if none."""
    return int(
        _scan(
            start,
            stop,
            p.mode,
            p.spacing,
            p.buy_count,
            p.buys,
            p.sell_count,
            p.sells,
            p.sell_cum,
            p.tolerance[0],
            p.tolerance[1],
            live,
            is_buy,
            available_steps,
        )
    )
