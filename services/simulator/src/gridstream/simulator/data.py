"""Candle loading and the synthetic trade path inside a candle.

Trade path rule (also in the README): every 1m candle is replayed as a price path

    open -> first extreme -> second extreme -> close

where the first extreme is the *high* when the candle closed down (``close < open``)
and the *low* otherwise (``close >= open``): the path visits the extreme on the
"wrong" side first, which is the pessimistic assumption for a grid (both sides of
the range get touched). ``n`` trades (``GS_SIM_TRADES_PER_CANDLE``, >= 4) are placed
on that path: one on each of the four vertices, the other ``n - 4`` spread linearly
inside the three segments, allotted to segments in proportion to their length
(largest remainder). Prices are rounded half-up to the symbol's tick size. Trade
``i`` (0-based) prints at ``open_time + i * 60000 // n``. Each trade's quantity is
``volume / n`` rounded down to 8 decimals, with the rounding remainder added to the
last trade, so the quantities sum exactly to the candle volume. A trade is
buyer-maker (``m: true``) when its price is below the previous trade's price.

CSV columns that are empty in the source files are derived: quote volume is the sum
of ``price * qty`` over the synthesised trades (8 decimals), the trade count is
``n``, taker-buy base/quote volumes are the sums over the trades with ``m: false``.
"""

from __future__ import annotations

import gzip
from bisect import bisect_left
from dataclasses import dataclass
from decimal import ROUND_DOWN, ROUND_HALF_UP, Decimal
from pathlib import Path

MINUTE_MS = 60_000
Q8 = Decimal("0.00000001")


@dataclass(frozen=True, slots=True)
class Candle:
    open_time: int
    open: Decimal
    high: Decimal
    low: Decimal
    close: Decimal
    volume: Decimal

    @property
    def close_time(self) -> int:
        return self.open_time + MINUTE_MS - 1


@dataclass(frozen=True, slots=True)
class SynthTrade:
    time: int
    price: Decimal
    qty: Decimal
    buyer_maker: bool


def load_candles(path: Path, until_open_ms: int | None = None) -> list[Candle]:
    """Read a ``<SYMBOL>-1m.csv.gz`` file; keep rows with ``open_time < until_open_ms``."""
    out: list[Candle] = []
    with gzip.open(path, "rt", encoding="ascii") as fh:
        header = fh.readline()
        if not header.startswith("open_time_ms,open,high,low,close,volume"):
            raise ValueError(f"{path}: unexpected header {header.strip()!r}")
        for line in fh:
            f = line.split(",", 6)
            t = int(f[0])
            if until_open_ms is not None and t >= until_open_ms:
                break
            out.append(
                Candle(t, Decimal(f[1]), Decimal(f[2]), Decimal(f[3]), Decimal(f[4]), Decimal(f[5]))
            )
    return out


def first_open_time(path: Path) -> int:
    with gzip.open(path, "rt", encoding="ascii") as fh:
        fh.readline()
        return int(fh.readline().split(",", 1)[0])


def path_vertices(c: Candle) -> tuple[Decimal, Decimal, Decimal, Decimal]:
    """open, first extreme, second extreme, close (see module docstring)."""
    if c.close < c.open:
        return (c.open, c.high, c.low, c.close)
    return (c.open, c.low, c.high, c.close)


def _allot(lengths: list[Decimal], k: int) -> list[int]:
    """Split ``k`` interior points over segments proportionally (largest remainder)."""
    total = sum(lengths, Decimal(0))
    if k == 0:
        return [0] * len(lengths)
    if total == 0:
        base = [k // len(lengths)] * len(lengths)
        for i in range(k - sum(base)):
            base[i] += 1
        return base
    shares = [length * k / total for length in lengths]
    counts = [int(s) for s in shares]
    rest = k - sum(counts)
    order = sorted(range(len(lengths)), key=lambda i: (-(shares[i] - counts[i]), i))
    for i in order[:rest]:
        counts[i] += 1
    return counts


def synth_trades(c: Candle, n: int, tick: Decimal) -> list[SynthTrade]:
    """The ``n`` synthetic trades of candle ``c`` (``n >= 4``)."""
    if n < 4:
        raise ValueError("need at least 4 trades per candle")
    v = path_vertices(c)
    lengths = [abs(v[1] - v[0]), abs(v[2] - v[1]), abs(v[3] - v[2])]
    counts = _allot(lengths, n - 4)
    prices: list[Decimal] = [v[0]]
    for seg in range(3):
        a, b = v[seg], v[seg + 1]
        k = counts[seg]
        for m in range(1, k + 1):
            p = a + (b - a) * m / (k + 1)
            prices.append((p / tick).quantize(Decimal(1), rounding=ROUND_HALF_UP) * tick)
        prices.append(b)
    q = (c.volume / n).quantize(Q8, rounding=ROUND_DOWN)
    last_q = c.volume - q * (n - 1)
    out: list[SynthTrade] = []
    prev = prices[0]
    for i, p in enumerate(prices):
        out.append(
            SynthTrade(
                time=c.open_time + i * MINUTE_MS // n,
                price=p,
                qty=last_q if i == n - 1 else q,
                buyer_maker=p < prev,
            )
        )
        prev = p
    return out


class CandleSeries:
    """The 1m candles of one symbol, sorted by open time."""

    def __init__(self, candles: list[Candle]) -> None:
        self.candles = candles
        self.opens = [c.open_time for c in candles]

    def index_at_or_after(self, open_ms: int) -> int:
        return bisect_left(self.opens, open_ms)

    def get(self, open_ms: int) -> Candle | None:
        i = bisect_left(self.opens, open_ms)
        if i < len(self.opens) and self.opens[i] == open_ms:
            return self.candles[i]
        return None
