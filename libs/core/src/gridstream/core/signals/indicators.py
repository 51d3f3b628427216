"""Incremental indicators: constant cost per candle, TA-Lib's conventions.

Every class takes one value (or one candle's high/low/close/volume) per call and keeps only
what the next call needs: running sums over a ring of the window, Wilder averages, monotonic
deques. Nothing re-reads a whole window per candle. Rolling means and variances are updated
in O(1) (Welford's add-and-remove update) and re-summed exactly (``math.fsum``) once per
window length, so rounding never drifts: amortised O(1), and within ~1e-11 of exact sums.

Conventions (``i`` = index of the candle in its series, from 0; "lookback" = the index of the
first value, TA-Lib's name for it; the warm-up is lookback + 1 candles):

* SMA(n): mean of the last n closes. Lookback n-1.
* EMA(n): first value the SMA of the first n closes, then ``ema += (x - ema) * 2/(n+1)``.
  Lookback n-1.
* RSI(n), Wilder: average gain and loss start as the mean of the first n changes, then
  ``avg = (avg*(n-1) + x)/n``; ``rsi = 100*gain/(gain+loss)`` (0 when both are zero).
  Lookback n.
* ATR(n), Wilder: true range from i = 1 (needs the previous close); first ATR the mean of the
  first n true ranges, then Wilder. Lookback n.
* Bollinger(n, k): middle = SMA(n), upper/lower = middle +- k * population std of the last n
  closes; width = (upper - lower) / middle. Lookback n-1.
* +DI/-DI(n) and ADX(n), TA-Lib's: directional movements and true ranges from i = 1, summed
  over the first n-1 of them, then Wilder-smoothed as ``s = s - s/n + x``;
  ``DI = 100 * dm / tr`` (lookback n); ``DX = 100*|+DI - -DI|/(+DI + -DI)``; ADX = mean of the
  first n DX, then Wilder (lookback 2n-1). A DX whose DI sum (or smoothed range) is zero
  (|v| < 1e-14, TA-Lib's TA_IS_ZERO) is skipped, as TA-Lib does.
* Donchian(n): highest high and lowest low of the last n candles, middle their mean.
  Lookback n-1.
* realised volatility(w): population std of the last w log returns ln(close_i/close_{i-1}),
  per candle (not annualised). Lookback w.
* VWAP(n): rolling n-candle VWAP of the typical price (high+low+close)/3,
  ``sum(tp*volume)/sum(volume)`` over the last n candles; the close when none of them traded.
  Lookback n-1. (TA-Lib has no VWAP.)
"""

from __future__ import annotations

import math
from collections import deque

NAN = math.nan
#: TA-Lib's TA_IS_ZERO threshold (TA-Lib >= 0.6).
TA_EPSILON = 1e-14


def ta_is_zero(v: float) -> bool:
    return -TA_EPSILON < v < TA_EPSILON


def true_range(high: float, low: float, prev_close: float) -> float:
    """The candle's range extended to the previous close (the ATR's input)."""
    return max(high - low, abs(prev_close - high), abs(low - prev_close))


class RollingStats:
    """Mean and population standard deviation of the last ``n`` values, O(1) per value.

    Welford's add-and-remove update runs on ``x - anchor`` (the anchor is a recent mean;
    the subtraction is exact for values near it), so rounding scales with the spread of the
    values, not their level; an exact re-sum (``math.fsum``) every ``n`` values re-anchors
    and stops drift.
    """

    __slots__ = ("anchor", "buf", "m2", "n", "since", "ymean")

    def __init__(self, n: int) -> None:
        self.n = n
        self.buf: deque[float] = deque()
        self.anchor = math.nan
        self.ymean = 0.0
        self.m2 = 0.0
        self.since = 0

    @property
    def full(self) -> bool:
        return len(self.buf) == self.n

    @property
    def mean(self) -> float:
        return self.anchor + self.ymean

    def push(self, x: float) -> None:
        buf = self.buf
        n = self.n
        if len(buf) < n:
            if not buf:
                self.anchor = x
            buf.append(x)
            y = x - self.anchor
            d = y - self.ymean
            self.ymean += d / len(buf)
            self.m2 += d * (y - self.ymean)
            return
        old = buf.popleft()
        buf.append(x)
        a = self.anchor
        y, oy = x - a, old - a
        om = self.ymean
        d = y - oy
        nm = om + d / n
        self.ymean = nm
        self.m2 += d * (y - nm + oy - om)
        self.since += 1
        if self.since >= n:
            self.since = 0
            a = self.anchor = math.fsum(buf) / n
            ys = [v - a for v in buf]
            m = self.ymean = math.fsum(ys) / n
            self.m2 = math.fsum([(v - m) * (v - m) for v in ys])

    def std(self) -> float:
        m2 = self.m2
        return math.sqrt(m2 / self.n) if m2 > 0.0 else 0.0


class RollingSum:
    """Sum of the last ``n`` values, O(1) per value, re-summed exactly once per window."""

    __slots__ = ("buf", "n", "since", "total")

    def __init__(self, n: int) -> None:
        self.n = n
        self.buf: deque[float] = deque()
        self.total = 0.0
        self.since = 0

    def push(self, x: float) -> None:
        buf = self.buf
        buf.append(x)
        self.total += x
        if len(buf) > self.n:
            self.total -= buf.popleft()
            self.since += 1
            if self.since >= self.n:
                self.since = 0
                self.total = math.fsum(buf)


class Wilder:
    """Wilder's average: the mean of the first ``n`` inputs, then ``(avg*(n-1) + x)/n``."""

    __slots__ = ("count", "n", "total", "value")

    def __init__(self, n: int) -> None:
        self.n = n
        self.count = 0
        self.total = 0.0
        self.value = NAN

    def push(self, x: float) -> float:
        n = self.n
        c = self.count = self.count + 1
        if c > n:
            self.value = (self.value * (n - 1) + x) / n
        elif c == n:
            self.value = (self.total + x) / n
        else:
            self.total += x
        return self.value


class Ema:
    """TA-Lib's EMA: SMA seed over the first ``n`` values, then ``ema += (x - ema) * k``."""

    __slots__ = ("count", "k", "n", "total", "value")

    def __init__(self, n: int) -> None:
        self.n = n
        self.k = 2.0 / (n + 1)
        self.count = 0
        self.total = 0.0
        self.value = NAN

    def push(self, x: float) -> float:
        c = self.count = self.count + 1
        if c > self.n:
            v = self.value
            self.value = (x - v) * self.k + v
        elif c == self.n:
            self.value = (self.total + x) / self.n
        else:
            self.total += x
        return self.value


class MonotonicExtreme:
    """Max (or min) of the last ``n`` values with a monotonic deque: amortised O(1)."""

    __slots__ = ("i", "n", "q", "sign")

    def __init__(self, n: int, *, maximum: bool) -> None:
        self.n = n
        self.sign = 1.0 if maximum else -1.0
        self.q: deque[tuple[int, float]] = deque()
        self.i = -1

    def push(self, x: float) -> float:
        self.i += 1
        i = self.i
        q = self.q
        v = self.sign * x
        while q and q[-1][1] <= v:
            q.pop()
        q.append((i, v))
        if q[0][0] <= i - self.n:
            q.popleft()
        return self.sign * q[0][1]


class Directional:
    """TA-Lib's +DI, -DI (lookback n) and ADX (lookback 2n-1) of one series."""

    __slots__ = (
        "adx",
        "dx_sum",
        "i",
        "mdm",
        "minus_di",
        "n",
        "pdm",
        "plus_di",
        "prev_close",
        "prev_high",
        "prev_low",
        "tr",
    )

    def __init__(self, n: int) -> None:
        self.n = n
        self.i = -1
        self.prev_high = self.prev_low = self.prev_close = NAN
        self.pdm = self.mdm = self.tr = 0.0
        self.plus_di = self.minus_di = NAN
        self.dx_sum = 0.0
        self.adx = NAN

    def push(self, high: float, low: float, close: float) -> None:
        self.i += 1
        i = self.i
        if i == 0:
            self.prev_high, self.prev_low, self.prev_close = high, low, close
            return
        dp = high - self.prev_high
        dm = self.prev_low - low
        plus = dp if (dp > 0 and dp > dm) else 0.0
        minus = dm if (dm > 0 and dp < dm) else 0.0
        tr = true_range(high, low, self.prev_close)
        self.prev_high, self.prev_low, self.prev_close = high, low, close
        n = self.n
        if i < n:
            self.pdm += plus
            self.mdm += minus
            self.tr += tr
            return
        self.pdm = self.pdm - self.pdm / n + plus
        self.mdm = self.mdm - self.mdm / n + minus
        self.tr = self.tr - self.tr / n + tr
        if ta_is_zero(self.tr):
            self.plus_di = self.minus_di = 0.0
        else:
            self.plus_di = 100.0 * (self.pdm / self.tr)
            self.minus_di = 100.0 * (self.mdm / self.tr)
        total = self.plus_di + self.minus_di
        dx = NAN if ta_is_zero(total) else 100.0 * (abs(self.minus_di - self.plus_di) / total)
        last = 2 * n - 1
        if i < last:
            if dx == dx:
                self.dx_sum += dx
        elif i == last:
            if dx == dx:
                self.dx_sum += dx
            self.adx = self.dx_sum / n
        elif dx == dx:
            self.adx = (self.adx * (n - 1) + dx) / n
