"""Compiled scans of a backtest that skips candles (numba; imported only by such a run)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from numba import njit

Ints = npt.NDArray[np.int64]


@njit(cache=True, nogil=True)
def _first_reach(low: Ints, high: Ints, start: int, stop: int, buy_at: int, sell_at: int) -> int:
    for j in range(start, stop):  # pragma: no cover - compiled
        if low[j] <= buy_at or high[j] >= sell_at:
            return j
    return stop


def first_reach(low: Ints, high: Ints, start: int, stop: int, buy_at: int, sell_at: int) -> int:
    """The first candle in ``[start, stop)`` whose range reaches a resting order: its low
    at or under ``buy_at`` or its high at or over ``sell_at`` (prices in units); ``stop``
    if none."""
    return int(_first_reach(low, high, start, stop, buy_at, sell_at))
