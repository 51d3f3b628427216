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
import io
import itertools
from bisect import bisect_left
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import ROUND_DOWN, ROUND_HALF_UP, Decimal
from pathlib import Path

from gridstream.common.intervals import MINUTE_MS as MINUTE_MS
from gridstream.common.intervals import MINUTE_TO_DAY_MS
from gridstream.core import fills as fill_rules

Q8 = Decimal("0.00000001")
ZERO = Decimal(0)
#: The kline intervals the simulator serves: Binance's, from one minute to one day.
INTERVALS_MS = MINUTE_TO_DAY_MS
INTERVAL_NAMES = {ms: name for name, ms in INTERVALS_MS.items()}


@dataclass(frozen=True, slots=True)
class Candle:
    """One candle. The optional statistics are set when the source has them (a Binance
    kline file, or a candle built from real trades); otherwise they are derived from the
    synthetic trade path."""

    open_time: int
    open: Decimal
    high: Decimal
    low: Decimal
    close: Decimal
    volume: Decimal
    interval_ms: int = MINUTE_MS
    quote_volume: Decimal | None = None
    count: int | None = None
    taker_base: Decimal | None = None
    taker_quote: Decimal | None = None

    @property
    def close_time(self) -> int:
        return self.open_time + self.interval_ms - 1

    @property
    def has_stats(self) -> bool:
        return self.count is not None


@dataclass(frozen=True, slots=True)
class SynthTrade:
    """A print on the tape: a synthetic trade, or a real trade / aggTrade from a file.

    For real prints ``trade_id``/``agg_id``/``first_id``/``last_id`` are the file's ids
    (a trades file: ``first_id == last_id == trade_id``); synthetic prints leave them
    ``None`` and the engine numbers them.
    """

    time: int
    price: Decimal
    qty: Decimal
    buyer_maker: bool
    trade_id: int | None = None
    agg_id: int | None = None
    first_id: int | None = None
    last_id: int | None = None

    @property
    def count(self) -> int:
        if self.first_id is None or self.last_id is None:
            return 1
        return self.last_id - self.first_id + 1


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
    """open, first extreme, second extreme, close (see module docstring): the kernel's
    rule, :func:`gridstream.core.fills.path_vertices`."""
    return fill_rules.path_vertices(c.open, c.high, c.low, c.close)


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
                time=fill_rules.trade_time(c.open_time, c.interval_ms, i, n),
                price=p,
                qty=last_q if i == n - 1 else q,
                buyer_maker=p < prev,
            )
        )
        prev = p
    return out


class CandleSeries:
    """The candles of one symbol (one interval, ``interval_ms``), sorted by open time.

    ``prints`` is set for a series built from a real trade file: the real prints of each
    candle by open time (then they replace the synthetic trade path).
    """

    def __init__(
        self,
        candles: list[Candle],
        prints: dict[int, tuple[SynthTrade, ...]] | None = None,
    ) -> None:
        self.candles = candles
        self.opens = [c.open_time for c in candles]
        self.interval_ms = candles[0].interval_ms if candles else MINUTE_MS
        self.prints = prints
        self.digits_price = 0
        self.digits_qty = 0
        self.max_trade_id = 0
        if prints is not None:
            for ps in prints.values():
                for p in ps:
                    self.max_trade_id = max(self.max_trade_id, p.last_id or 0)

    def index_at_or_after(self, open_ms: int) -> int:
        return bisect_left(self.opens, open_ms)

    def get(self, open_ms: int) -> Candle | None:
        i = bisect_left(self.opens, open_ms)
        if i < len(self.opens) and self.opens[i] == open_ms:
            return self.candles[i]
        return None


# ---------------------------------------------------------------- any candle/trade file
#
# Layouts recognised (CSV, optionally gzip-compressed, with or without a header line):
#   candles: ``open_time,open,high,low,close,volume[,close_time,quote_volume,count,
#            taker_buy_base,taker_buy_quote[,ignore]]`` (our data/klines files and
#            Binance's own kline CSVs from data.binance.vision)
#   trades:  ``id,price,qty,quote_qty,time,is_buyer_maker[,is_best_match]``
#   aggTrades: ``agg_id,price,qty,first_id,last_id,time,is_buyer_maker[,is_best_match]``
# Times in microseconds (data.binance.vision spot files since 2025) are turned into ms.

_BOOLS = {"true": True, "false": False}


def _ms(raw: str) -> int:
    t = int(raw)
    return t // 1000 if t >= 10**14 else t


def _open_text(path: Path) -> io.TextIOBase:
    with path.open("rb") as fh:
        magic = fh.read(2)
    if magic == b"\x1f\x8b":
        return gzip.open(path, "rt", encoding="ascii")
    return path.open("r", encoding="ascii")


def _rows(path: Path) -> Iterator[list[str]]:
    with _open_text(path) as fh:
        for line in fh:
            line = line.strip()
            if line:
                yield line.split(",")


def _is_bool(v: str) -> bool:
    return v.strip().lower() in _BOOLS


def detect_layout(row: list[str]) -> str:
    """``"trades"``, ``"aggTrades"`` or ``"klines"`` from one data row."""
    if len(row) >= 7 and _is_bool(row[6]) and not _is_bool(row[5]):
        return "aggTrades"
    if len(row) >= 6 and _is_bool(row[5]):
        return "trades"
    return "klines"


def _dec_digits(d: Decimal) -> int:
    exp = d.normalize().as_tuple().exponent
    return max(0, -exp) if isinstance(exp, int) else 0


@dataclass(frozen=True, slots=True)
class LoadedFile:
    layout: str
    series: CandleSeries


def load_file(path: Path, until_open_ms: int | None = None) -> LoadedFile:
    """Load any recognised candle or trade file (see the layouts above)."""
    rows = _rows(path)
    first = next(rows, None)
    if first is None:
        raise ValueError(f"{path}: empty file")
    head: list[list[str]] = []
    if first[0].strip().lstrip("-").isdigit():
        head.append(first)
    else:
        nxt = next(rows, None)
        if nxt is None:
            raise ValueError(f"{path}: no data rows")
        head.append(nxt)
    layout = detect_layout(head[0])

    def all_rows() -> Iterator[list[str]]:
        yield from head
        yield from rows

    if layout == "klines":
        series = _load_kline_rows(path, all_rows(), until_open_ms)
    else:
        series = _load_trade_rows(layout, all_rows(), until_open_ms)
    return LoadedFile(layout, series)


def _opt_dec(f: list[str], i: int) -> Decimal | None:
    return Decimal(f[i]) if len(f) > i and f[i].strip() else None


def _load_kline_rows(
    path: Path, rows: Iterator[list[str]], until_open_ms: int | None
) -> CandleSeries:
    raw: list[list[str]] = []
    for f in rows:
        if until_open_ms is not None and _ms(f[0]) >= until_open_ms:
            break
        raw.append(f)
    if not raw:
        raise ValueError(f"{path}: no candles")
    # interval: from the close-time column when present, else from the spacing
    f0 = raw[0]
    if len(f0) > 6 and f0[6].strip():
        interval = _ms(f0[6]) - _ms(f0[0]) + 1
    elif len(raw) > 1:
        interval = min(_ms(b[0]) - _ms(a[0]) for a, b in itertools.pairwise(raw))
    else:
        interval = MINUTE_MS
    if interval not in INTERVAL_NAMES:
        raise ValueError(f"{path}: unsupported candle interval {interval} ms")
    out: list[Candle] = []
    digits_p = digits_q = 0
    for f in raw:
        o, h, lo, c, v = (Decimal(x) for x in f[1:6])
        qv, tb, tq = _opt_dec(f, 7), _opt_dec(f, 9), _opt_dec(f, 10)
        count = int(f[8]) if len(f) > 8 and f[8].strip() else None
        has = qv is not None and count is not None and tb is not None and tq is not None
        out.append(
            Candle(
                _ms(f[0]),
                o,
                h,
                lo,
                c,
                v,
                interval,
                qv if has else None,
                count if has else None,
                tb if has else None,
                tq if has else None,
            )
        )
        digits_p = max(digits_p, *(_dec_digits(x) for x in (o, h, lo, c)))
        digits_q = max(digits_q, _dec_digits(v))
    out.sort(key=lambda c: c.open_time)
    ser = CandleSeries(out)
    ser.digits_price, ser.digits_qty = digits_p, digits_q
    return ser


def _load_trade_rows(
    layout: str, rows: Iterator[list[str]], until_open_ms: int | None
) -> CandleSeries:
    prints: list[SynthTrade] = []
    digits_p = digits_q = 0
    agg = 0
    for f in rows:
        price, qty = Decimal(f[1]), Decimal(f[2])
        if layout == "trades":
            tid, t, m = int(f[0]), _ms(f[4]), _BOOLS[f[5].strip().lower()]
            agg += 1
            pr = SynthTrade(t, price, qty, m, tid, agg, tid, tid)
        else:
            first, last = int(f[3]), int(f[4])
            t, m = _ms(f[5]), _BOOLS[f[6].strip().lower()]
            pr = SynthTrade(t, price, qty, m, first, int(f[0]), first, last)
        if until_open_ms is not None and t - t % MINUTE_MS >= until_open_ms:
            break
        prints.append(pr)
        digits_p = max(digits_p, _dec_digits(price))
        digits_q = max(digits_q, _dec_digits(qty))
    if not prints:
        raise ValueError("trade file has no trades")
    prints.sort(key=lambda p: (p.time, p.first_id or 0))
    ser = candles_from_prints(prints)
    ser.digits_price, ser.digits_qty = digits_p, digits_q
    return ser


def kline_of_prints(open_time: int, prints: list[SynthTrade], prev_close: Decimal) -> Candle:
    """The 1m kline Binance reports for these prints (all in the minute ``open_time``):
    open = first price, close = last, high/low, volume = sum qty, quote volume =
    sum price*qty, count = number of trades, taker-buy volumes over the prints whose
    buyer was the taker (``is_buyer_maker`` false). No prints: a flat candle at the
    previous close with zero volume, as Binance reports a minute without trades."""
    if not prints:
        return Candle(
            open_time, prev_close, prev_close, prev_close, prev_close, ZERO,
            MINUTE_MS, ZERO, 0, ZERO, ZERO,
        )  # fmt: skip
    ps = [p.price for p in prints]
    return Candle(
        open_time,
        ps[0],
        max(ps),
        min(ps),
        ps[-1],
        sum((p.qty for p in prints), ZERO),
        MINUTE_MS,
        sum((p.price * p.qty for p in prints), ZERO),
        sum(p.count for p in prints),
        sum((p.qty for p in prints if not p.buyer_maker), ZERO),
        sum((p.price * p.qty for p in prints if not p.buyer_maker), ZERO),
    )


def candles_from_prints(prints: list[SynthTrade]) -> CandleSeries:
    """1m candles (every minute from the first print's to the last's) and their prints."""
    by_min: dict[int, list[SynthTrade]] = {}
    for p in prints:
        by_min.setdefault(p.time - p.time % MINUTE_MS, []).append(p)
    first, last = min(by_min), max(by_min)
    candles: list[Candle] = []
    grouped: dict[int, tuple[SynthTrade, ...]] = {}
    prev = prints[0].price
    for t in range(first, last + MINUTE_MS, MINUTE_MS):
        ps = by_min.get(t, [])
        c = kline_of_prints(t, ps, prev)
        candles.append(c)
        grouped[t] = tuple(ps)
        prev = c.close
    return CandleSeries(candles, grouped)
