"""The backtest driver: candles through the very engines that trade, candle by candle.

For each close time, the candles of every symbol that close then (in symbol order): first
the fills of each (step 1-2), then each one's close, candle and signals (steps 3-5), as a
venue trades every symbol at once before the strategy sees the closes.

1. **Fills.** The orders of the candle's symbol meet the candle's price path, the
   simulator's documented path: ``open -> first extreme -> second extreme -> close``, the
   high first when the candle closes down (``close < open``), else the low first
   (:func:`gridstream.core.fills.path_vertices`). Vertex ``k`` is at
   ``open_time + k x interval / 4`` (:func:`gridstream.core.fills.vertex_times`: the
   simulator's tape with 4 trades per candle); an order takes part from ``submitted +
   latency_ms``.

   * A MARKET order fills as taker at the first vertex it is active at, moved against it
     by ``slippage_bps``.
   * A LIMIT order that would cross where it reaches the book fills as taker at that
     price: with no latency it reaches the book when it is submitted, at the last trade
     (the candle's close); with latency, at the first vertex it is active at. Otherwise
     it rests and fills as maker at its own price once the path reaches it:
     on touch (``queue="touch"``: a BUY at ``P`` when the path trades at ``<= P``), or
     only when the price trades through it by one tick (``queue="through"``: ``<= P -
     tick``). Resting orders fill in the order the path meets them.
   * With ``volume_share`` set, the fills of one candle are capped by that share of its
     volume, shared by the orders in the order they fill; the rest of an order waits for
     the next candle (a market order's rest fills at the next open). Without it an order
     fills whole.
   * Fees: ``maker_fee`` / ``taker_fee`` (per symbol if given), charged in the asset
     received (Binance's rule) or, with ``fee_in_quote``, always in the quote asset.
2. Each fill goes to the portfolio, then (to the risk engine and) to the strategy as an
   ``OrderFilled``; what the strategy decides on it is submitted at the close vertex.
3. The candle's close marks the portfolio; equity is recorded once per close time.
4. The candle goes to the strategy; for a strategy that decides on signals, it first
   goes to the signal engine, and each signal to the strategy.
5. Intents go first to the risk engine when the run has one (the services' rules and the
   venue's filters; a rejection is an ``OrderRejected``), then to the venue: ``cancel``
   takes the order off the book (``OrderCanceled``); ``place`` is checked as the venue
   does (a BUY needs its notional free in the quote asset, plus the fee when fees are
   paid in the quote asset; a SELL its quantity free in the base asset; else rejected),
   then queued, submitted at the candle's close; a resting LIMIT order is
   ``OrderAccepted`` at once.

Everything is a pure function of the candles, the settings and the strategy: the same
inputs give the same fills, to the last digit.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol, runtime_checkable

import numpy as np

from gridstream.common.messages import (
    AnyMessage,
    Candle,
    OrderAccepted,
    OrderCanceled,
    OrderFailed,
    OrderFilled,
    OrderIntent,
    OrderRejected,
    OrderTypes,
    Side,
    deterministic_id,
)
from gridstream.core import orders as om
from gridstream.core.fills import commission, path_vertices, vertex_times, would_cross_on_arrival
from gridstream.core.portfolio import Portfolio
from gridstream.core.risk import RiskEngine
from gridstream.core.signals.batch import BatchSignals, SignalColumns, SignalSource
from gridstream.core.signals.engine import SignalEngine
from gridstream.core.strategies.base import Strategy

if TYPE_CHECKING:
    import polars as pl

ZERO = Decimal(0)
ONE = Decimal(1)
BPS = Decimal(10_000)
VENUE = "backtest"
Queue = Literal["touch", "through"]


class Rejections:
    """Reasons the backtest's own checks give (beside the risk engine's)."""

    INSUFFICIENT_BALANCE: str = "INSUFFICIENT_BALANCE"
    INSUFFICIENT_POSITION: str = "INSUFFICIENT_POSITION"
    DUPLICATE_ORDER: str = "DUPLICATE_ORDER"


@dataclass(frozen=True)
class FillSettings:
    """How orders fill (the settings the simulator and replay share)."""

    maker_fee: Decimal = Decimal("0.001")
    taker_fee: Decimal = Decimal("0.001")
    #: symbol -> (maker, taker), over the two above
    fees_by_symbol: Mapping[str, tuple[Decimal, Decimal]] = field(default_factory=dict)
    #: True: every fee in the quote asset; False: in the asset received (Binance).
    fee_in_quote: bool = False
    #: Share of a candle's volume the orders may take in that candle, in (0, 1]; None:
    #: no cap (what backtesting.py and most backtesters do).
    volume_share: Decimal | None = None
    queue: Queue = "touch"
    #: symbol -> tick size, for ``queue="through"``
    tick_sizes: Mapping[str, Decimal] = field(default_factory=dict)
    default_tick: Decimal = Decimal("0.01")
    latency_ms: int = 0
    #: Market orders fill this far beyond the path's price (against the order).
    slippage_bps: Decimal = ZERO
    fee_places: int = 8

    def __post_init__(self) -> None:
        if self.volume_share is not None and not ZERO < self.volume_share <= ONE:
            raise ValueError("volume_share must be in (0, 1]")
        if self.queue not in ("touch", "through"):
            raise ValueError("queue must be 'touch' or 'through'")
        if self.latency_ms < 0:
            raise ValueError("latency_ms must be >= 0")
        if self.slippage_bps < 0 or self.maker_fee < 0 or self.taker_fee < 0:
            raise ValueError("fees and slippage must be >= 0")

    def fees(self, symbol: str) -> tuple[Decimal, Decimal]:
        return self.fees_by_symbol.get(symbol, (self.maker_fee, self.taker_fee))

    def tick(self, symbol: str) -> Decimal:
        return self.tick_sizes.get(symbol, self.default_tick)


@dataclass(frozen=True)
class Fill:
    """One fill of the backtest (what ``fills.csv`` holds)."""

    time_ms: int
    symbol: str
    side: Side
    price: Decimal
    qty: Decimal
    fee: Decimal
    fee_asset: str
    liquidity: Literal["maker", "taker"]
    client_order_id: str


@dataclass(frozen=True)
class EquityPoint:
    """Equity at one close time, with each symbol's position and last price (in the
    order of :attr:`BacktestResult.symbols`; a price is None before its first candle)."""

    time_ms: int
    equity: Decimal
    positions: tuple[Decimal, ...]
    prices: tuple[Decimal | None, ...]


@dataclass
class EquityCurve:
    """Equity at each close time, with each symbol's position and last price, as columns
    (symbol order: :attr:`symbols`; a price is None before the symbol's first candle)."""

    symbols: tuple[str, ...]
    times: list[int] = field(default_factory=list)
    equity: list[Decimal] = field(default_factory=list)
    positions: list[list[Decimal]] = field(default_factory=list)
    _prices: list[list[Decimal | None]] = field(default_factory=list)
    #: The prices as the candles' text, until :attr:`prices` is read (a column run).
    _price_text: list[list[str]] | None = None
    #: The same as floats, for analytics (set by the columnar run, else made on demand).
    _equity_f: np.ndarray | None = None
    _prices_f: list[np.ndarray] | None = None
    _held: np.ndarray | None = None

    def __post_init__(self) -> None:
        if not self.positions:
            self.positions = [[] for _ in self.symbols]
            self._prices = [[] for _ in self.symbols]

    @property
    def prices(self) -> list[list[Decimal | None]]:
        """Each symbol's last price at each point (made from the candles' text when first
        read after a column run: most runs never read them)."""
        if self._price_text is not None:
            self._prices = [[Decimal(x) for x in col] for col in self._price_text]
            self._price_text = None
        return self._prices

    def equity_floats(self) -> np.ndarray:
        if self._equity_f is None:
            self._equity_f = np.asarray([float(e) for e in self.equity], dtype=np.float64)
        return self._equity_f

    def price_floats(self, k: int) -> np.ndarray:
        """Symbol ``k``'s price at each point (NaN before its first candle)."""
        if self._prices_f is None:
            self._prices_f = [
                np.asarray([np.nan if p is None else float(p) for p in col], dtype=np.float64)
                for col in self.prices
            ]
        return self._prices_f[k]

    def held(self) -> np.ndarray:
        """True where any position is open."""
        if self._held is None:
            out = np.zeros(len(self.times), dtype=bool)
            for col in self.positions:
                out |= np.asarray([q != 0 for q in col], dtype=bool)
            self._held = out
        return self._held

    def __len__(self) -> int:
        return len(self.times)

    def __getitem__(self, i: int) -> EquityPoint:
        return EquityPoint(
            self.times[i],
            self.equity[i],
            tuple(p[i] for p in self.positions),
            tuple(p[i] for p in self.prices),
        )

    def __iter__(self) -> Iterator[EquityPoint]:
        return (self[i] for i in range(len(self.times)))


@dataclass
class Bars:
    """One symbol's candles as columns (what files load into): open times, the prices and
    volume as their exact text, and the closes as integers of ``10**-CLOSE_PLACES``."""

    symbol: str
    interval: str
    interval_ms: int
    open_time: np.ndarray
    open: list[str]
    high: list[str]
    low: list[str]
    close: list[str]
    volume: list[str]
    close_units: np.ndarray
    source: str = "file"

    def __len__(self) -> int:
        return len(self.close)

    def candle(self, i: int) -> Candle:
        t = int(self.open_time[i])
        ms = self.interval_ms
        return Candle(
            id=f"bt:{self.symbol}:{self.interval}:{t}",
            ts_event=(t + ms) * 1_000_000,
            ts_init=(t + ms) * 1_000_000,
            symbol=self.symbol,
            interval=self.interval,
            open_time=t,
            close_time=t + ms - 1,
            open=Decimal(self.open[i]),
            high=Decimal(self.high[i]),
            low=Decimal(self.low[i]),
            close=Decimal(self.close[i]),
            volume=Decimal(self.volume[i]),
            source=self.source,
        )

    def candles(self) -> Iterator[Candle]:
        return (self.candle(i) for i in range(len(self.close)))

    def window(self, start_ms: int, end_ms: int) -> Bars:
        """The bars opening in ``[start_ms, end_ms)``."""
        a = int(np.searchsorted(self.open_time, start_ms, side="left"))
        b = int(np.searchsorted(self.open_time, end_ms, side="left"))
        units = self.close_units[a:b] if len(self.close_units) == len(self) else self.close_units
        return Bars(
            symbol=self.symbol,
            interval=self.interval,
            interval_ms=self.interval_ms,
            open_time=self.open_time[a:b],
            open=self.open[a:b],
            high=self.high[a:b],
            low=self.low[a:b],
            close=self.close[a:b],
            volume=self.volume[a:b],
            close_units=units,
            source=self.source,
        )


#: Closes in :attr:`Bars.close_units` are integers of this many decimal places.
CLOSE_PLACES: Final = 8


@runtime_checkable
class ColumnarStrategy(Protocol):
    """A strategy whose candle decisions can be found over whole columns at once.

    ``decision_bars`` gives, for every bar of ``bars``, 0 where ``on_candle`` could not act whatever
    the strategy's orders and position, else a value handed to ``on_decision`` with that
    bar's candle, which then decides exactly as ``on_candle`` would have. The two paths
    are held equal by a test, fill for fill.
    """

    def decision_bars(self, bars: Bars) -> np.ndarray: ...

    def on_decision(self, c: Candle, value: int) -> list[OrderIntent]: ...


@runtime_checkable
class SkippingStrategy(Protocol):
    """A strategy that decides on signals and, given every signal in advance, can prove
    on which candles it would decide nothing as it stands now.

    ``skip_plan`` prepares one series (its signals' columns, its closes in units of
    ``10**-places``) once, or gives None (that series is then stepped candle by candle);
    ``next_busy`` gives the first candle in ``[start, stop)`` where the strategy, in its
    state now, may decide anything. A test holds the skipping run equal to the candle by
    candle run, fill for fill.
    """

    def skip_plan(
        self, symbol: str, signals: SignalColumns, close_units: np.ndarray, places: int
    ) -> object | None: ...

    def next_busy(self, symbol: str, plan: Any, start: int, stop: int) -> int: ...


def one_timeline(bars: Mapping[str, Bars]) -> bool:
    """Do all the series open at the same times (what the column runs need)?"""
    series = list(bars.values())
    return all(np.array_equal(b.open_time, series[0].open_time) for b in series[1:])


def price_units(texts: Sequence[str] | pl.Series, places: int = 8) -> np.ndarray | None:
    """Prices given as plain decimal text (a list, or a text column), as exact integers of
    ``10**-places`` (None if one has more decimals or is not plain decimal text)."""
    import polars as pl

    column = texts if isinstance(texts, pl.Series) else pl.Series(texts, dtype=pl.Utf8)
    try:
        parts = column.str.strip_chars().str.split_exact(".", 1)
        whole = parts.struct.field("field_0").cast(pl.Int64, strict=True)
        frac = parts.struct.field("field_1").fill_null("")
        if bool((frac.str.len_chars() > places).any()) or bool(
            (whole < 0).any() or whole.null_count()
        ):
            return None
        scaled = frac.str.pad_end(places, "0").cast(pl.Int64, strict=True)
        units = whole * 10**places + scaled
        if units.null_count():
            return None
        out: np.ndarray = units.to_numpy()
        return out
    except (pl.exceptions.ComputeError, pl.exceptions.InvalidOperationError):
        return None


def _floats_of(values: list[Decimal]) -> np.ndarray:
    """``float(v)`` of every value, converting once per run of the same object (a flat
    stretch of an equity curve repeats one Decimal)."""
    out = np.empty(len(values), dtype=np.float64)
    last: object = None
    f = 0.0
    for i, v in enumerate(values):
        if v is not last:
            last, f = v, float(v)
        out[i] = f
    return out


class _Progress:
    """Tells a progress callback the candles passed, in steps of at least 10,000."""

    def __init__(self, progress: Callable[[int], None] | None, width: int) -> None:
        self.progress = progress
        self.width = width
        self.done = 0

    def at(self, bar: int) -> None:
        if self.progress is not None and (bar - self.done) * self.width >= 10_000:
            self.progress((bar - self.done) * self.width)
            self.done = bar

    def end(self, bars: int) -> None:
        if self.progress is not None and bars > self.done:
            self.progress((bars - self.done) * self.width)
            self.done = bars


@dataclass
class _Order:
    intent: OrderIntent
    active_from_ms: int
    #: Its status and filled quantity, as the kernel's order state machine decides them.
    state: om.OrderState
    #: It has reached the book (at the first vertex it was active at).
    arrived: bool = False
    #: ``state.remaining_qty``, kept as the state moves (read on every vertex).
    remaining: Decimal = field(init=False)

    def __post_init__(self) -> None:
        self.remaining = self.state.remaining_qty

    @property
    def filled(self) -> Decimal:
        return self.state.filled_qty


def _reached(it: OrderIntent, lo: Decimal, hi: Decimal, through: Decimal) -> bool:
    """True when a path trading over ``[lo, hi]`` fills the resting limit order ``it``."""
    if it.side == "BUY":
        return lo <= it.price - through
    return hi >= it.price + through


def _quiet(book: Mapping[str, _Order], c: Candle, through: Decimal) -> bool:
    """True when candle ``c`` fills no order of ``book``, so the vertex walk of
    :meth:`Backtester._fills_in` would do nothing but let the limit orders that reach the
    book at the open (without crossing it) arrive: that is done here, and the walk skipped.

    Every order must be a limit order active from the open: one that arrives there and
    does not cross the open rests, and a resting order fills only where the path reaches
    it, and the path (open, both extremes, close) trades over all of ``[low, high]``.
    """
    t0, low, high = c.open_time, c.low, c.high
    arriving: list[_Order] = []
    for o in book.values():
        if o.remaining <= 0:
            continue
        it = o.intent
        if it.order_type == OrderTypes.MARKET or o.active_from_ms > t0:
            return False
        if _reached(it, low, high, through):
            return False
        if not o.arrived:
            if would_cross_on_arrival(it.side, it.price, c.open):
                return False
            arriving.append(o)
    for o in arriving:
        o.arrived = True
    return True


@dataclass
class BacktestResult:
    symbols: tuple[str, ...]
    fills: list[Fill]
    equity: EquityCurve
    portfolio: Portfolio
    interval_ms: int
    rejected: list[OrderRejected]
    #: symbol -> [(time_ms, side, price)] of every limit order placed (grid levels)
    levels: dict[str, list[tuple[int, Side, Decimal]]]
    start_cash: Decimal
    first_open: dict[str, Decimal]
    last_close: dict[str, Decimal]
    candles: int
    fill_settings: FillSettings
    #: Every order's final state (the order state machine's), by client order id.
    orders: dict[str, om.OrderState] = field(default_factory=dict)


class Backtester:
    """Holds the book, the portfolio and the engines of one run."""

    def __init__(
        self,
        strategy: Strategy,
        symbols: Mapping[str, tuple[str, str]],
        *,
        cash: Decimal,
        fill: FillSettings | None = None,
        signals: SignalSource | None = None,
        interval_ms: int = 60_000,
        record_levels: bool = True,
        risk: RiskEngine | None = None,
    ) -> None:
        quotes = {q for _b, q in symbols.values()}
        if len(quotes) != 1:
            raise ValueError(f"one quote asset per backtest, got {sorted(quotes)}")
        self.strategy = strategy
        self.symbols = tuple(sorted(symbols))
        self.assets = dict(symbols)
        self.fill = fill or FillSettings()
        self.portfolio = Portfolio.start(quotes.pop(), cash, symbols)
        self.signals: SignalSource = signals if signals is not None else SignalEngine()
        #: The risk engine every intent goes through first, as in the services (None: the
        #: venue's balance checks only).
        self.risk = risk
        self.interval_ms = interval_ms
        self.book: dict[str, dict[str, _Order]] = {s: {} for s in self.symbols}
        #: Every order placed, by client order id (its final state: ``.state``).
        self.orders: dict[str, _Order] = {}
        self.fills: list[Fill] = []
        self.equity = EquityCurve(self.symbols)
        self.rejected: list[OrderRejected] = []
        self.levels: dict[str, list[tuple[int, Side, Decimal]]] = {s: [] for s in self.symbols}
        self.record_levels = record_levels
        self.start_cash = cash
        self.first_open: dict[str, Decimal] = {}
        self.last_close: dict[str, Decimal] = {}
        self.candles = 0
        self._trade_no = 0

    # -- the loop ---------------------------------------------------------------------------
    def run(
        self,
        candles: Mapping[str, Iterable[Candle]],
        progress: Callable[[int], None] | None = None,
    ) -> BacktestResult:
        def keyed(sym: str, it: Iterable[Candle]) -> Iterable[tuple[int, str, Candle]]:
            return ((c.close_time, sym, c) for c in it)

        merged = heapq.merge(*(keyed(s, candles[s]) for s in sorted(candles)))
        group: list[Candle] = []
        last_time: int | None = None
        for n, (close_time, _sym, c) in enumerate(merged, 1):
            if last_time is not None and close_time != last_time:
                self.step_all(group)
                self._record(last_time)
                group = []
            last_time = close_time
            group.append(c)
            if progress is not None and n % 10_000 == 0:
                progress(10_000)
        if last_time is not None:
            self.step_all(group)
            self._record(last_time)
        return self.result()

    def run_columnar(
        self, bars: Mapping[str, Bars], progress: Callable[[int], None] | None = None
    ) -> BacktestResult:
        """The same run for a :class:`ColumnarStrategy` over symbols that share one
        timeline: only the bars where it may decide, or where an order is open, are
        stepped through the engines; equity in between is the balances times the closes.
        ``progress`` is told how many candles (bars x symbols) each stretch passed.
        """
        strategy = self.strategy
        if not isinstance(strategy, ColumnarStrategy):
            raise TypeError(f"{self.strategy.name} has no columnar decisions")
        syms = sorted(bars)
        first = bars[syms[0]]
        if not one_timeline(bars):
            raise ValueError("the columnar run needs one timeline for every symbol")
        n = len(first)
        decisions = {s: strategy.decision_bars(bars[s]) for s in syms}
        todo = sorted({int(i) for s in syms for i in np.flatnonzero(decisions[s])})
        heap = list(todo)
        heapq.heapify(heap)
        queued = set(todo)
        pf = self.portfolio
        base_of = {s: self.assets[s][0] for s in syms}
        # balances from each stepped bar on: (bar, quote balance, base balance by symbol)
        changes: list[tuple[int, Decimal, list[Decimal]]] = []
        told = _Progress(progress, len(syms))
        while heap:
            j = heapq.heappop(heap)
            told.at(j)
            stepped: dict[str, Candle] = {}
            for s in syms:
                if self.book[s]:
                    candle = stepped[s] = bars[s].candle(j)
                    self.last_close[s] = candle.close
                    for event in self._fills_in(candle):
                        self._feed(event, self._fills_time(candle))
            for s in syms:
                value = int(decisions[s][j])
                if value:
                    candle = stepped.get(s) or bars[s].candle(j)
                    self.last_close[s] = candle.close
                    pf.mark(s, candle.close)
                    for intent in strategy.on_decision(candle, value):
                        for reply in self._submit(intent, candle.close_time):
                            self._feed(reply, candle.close_time)
                if self.book[s] and j + 1 < n and j + 1 not in queued:
                    queued.add(j + 1)
                    heapq.heappush(heap, j + 1)
            changes.append((j, pf.balance(pf.quote), [pf.balance(base_of[s]) for s in syms]))
        told.end(n)
        return self._finish(bars, syms, n, changes)

    def run_skipping(
        self, bars: Mapping[str, Bars], progress: Callable[[int], None] | None = None
    ) -> BacktestResult:
        """The same run for a :class:`SkippingStrategy` on :class:`BatchSignals`, over
        symbols that share one timeline: a symbol's candle is stepped through the engines
        only where its strategy may decide (``next_busy``) or its range reaches one of its
        orders; every other candle would do nothing but mark the portfolio, and equity in
        between is the balances times the closes. ``progress`` is told how many candles
        (bars x symbols) each stretch passed."""
        strategy, signals = self.strategy, self.signals
        if not isinstance(strategy, SkippingStrategy) or not isinstance(signals, BatchSignals):
            raise TypeError(f"{self.strategy.name}: no skipping run (or no batch signals)")
        syms = sorted(bars)
        first = bars[syms[0]]
        if not one_timeline(bars):
            raise ValueError("the skipping run needs one timeline for every symbol")
        from gridstream.core import scan

        n = len(first)
        plans: dict[str, object | None] = {}
        ranges: dict[str, tuple[np.ndarray, np.ndarray] | None] = {}
        for s in syms:
            b = bars[s]
            whole = len(b.close_units) == len(b)
            plans[s] = (
                strategy.skip_plan(s, signals.columns(s), b.close_units, CLOSE_PLACES)
                if whole
                else None
            )
            low, high = price_units(b.low, CLOSE_PLACES), price_units(b.high, CLOSE_PLACES)
            ranges[s] = (low, high) if low is not None and high is not None else None
        fs = self.fill
        unit = Decimal(10) ** CLOSE_PLACES

        def next_busy(s: str, start: int) -> int:
            if start >= n:
                return n
            plan = plans[s]
            stop = start if plan is None else strategy.next_busy(s, plan, start, n)
            book = self.book[s]
            if not book or stop == start:
                return stop
            rng = ranges[s]
            if rng is None:
                return start
            through = fs.tick(s) * unit if fs.queue == "through" else ZERO
            buy_at, sell_at = -1, 2**62
            open_ms = int(first.open_time[start])
            for o in book.values():
                it = o.intent
                if o.remaining <= 0:
                    continue
                if it.order_type == OrderTypes.MARKET or not o.arrived:
                    return start  # it arrives or fills at the next candle: step it
                if o.active_from_ms > open_ms:
                    return start
                u = it.price * unit
                if u != u.to_integral_value():
                    return start
                if it.side == "BUY":
                    buy_at = max(buy_at, int(u - through))
                else:
                    sell_at = min(sell_at, int(u + through))
            return scan.first_reach(rng[0], rng[1], start, stop, buy_at, sell_at)

        pf = self.portfolio
        base_of = {s: self.assets[s][0] for s in syms}
        due = {s: next_busy(s, 0) for s in syms}
        changes: list[tuple[int, Decimal, list[Decimal]]] = []
        told = _Progress(progress, len(syms))
        while True:
            j = min(due.values())
            told.at(j)
            if j >= n:
                break
            group = [(s, bars[s].candle(j)) for s in syms if due[s] == j]
            for s, c in group:
                self.last_close[s] = c.close
                for event in self._fills_in(c):
                    self._feed(event, self._fills_time(c))
            for s, c in group:
                pf.mark(s, c.close)
                self._feed(c, c.close_time)
                for sig in signals.signal_at(c, j):
                    self._feed(sig, c.close_time)
            changes.append((j, pf.balance(pf.quote), [pf.balance(base_of[s]) for s in syms]))
            for s, _c in group:
                due[s] = next_busy(s, j + 1)
        told.end(n)
        return self._finish(bars, syms, n, changes)

    def _finish(
        self,
        bars: Mapping[str, Bars],
        syms: list[str],
        n: int,
        changes: list[tuple[int, Decimal, list[Decimal]]],
    ) -> BacktestResult:
        """The end of a run over columns: the equity curve from the balances of each
        stepped bar on, every symbol marked at its last close."""
        self._fill_curve(bars, syms, n, changes)
        for s in syms:
            self.first_open[s] = Decimal(bars[s].open[0]) if n else ZERO
            if n:
                self.last_close[s] = Decimal(bars[s].close[-1])
                self.portfolio.mark(s, self.last_close[s])
        self.candles = n * len(syms)
        return self.result()

    def _fill_curve(
        self,
        bars: Mapping[str, Bars],
        syms: list[str],
        n: int,
        changes: list[tuple[int, Decimal, list[Decimal]]],
    ) -> None:
        curve = self.equity
        ms = bars[syms[0]].interval_ms
        curve.times = (bars[syms[0]].open_time + (ms - 1)).tolist()
        texts = [bars[s].close for s in syms]
        closes_f = [bars[s].close_units / 10**CLOSE_PLACES for s in syms]
        curve._price_text = texts
        # balances are constant between stepped bars: one segment per change
        starts = np.asarray([0] + [j for j, _q, _h in changes], dtype=np.int64)
        quotes = [self.start_cash] + [q for _j, q, _h in changes]
        helds = [[ZERO] * len(syms)] + [h for _j, _q, h in changes]
        widths = np.diff(np.concatenate((starts, [n])))
        keep = widths > 0
        starts, widths = starts[keep], widths[keep]
        quotes = [q for q, k in zip(quotes, keep, strict=True) if k]
        helds = [h for h, k in zip(helds, keep, strict=True) if k]
        seg = np.repeat(np.arange(len(widths)), widths)  # segment of each bar
        quote_col = np.asarray(quotes, dtype=object)[seg]
        equity_f = np.asarray([float(q) for q in quotes])[seg]
        held_any = np.zeros(n, dtype=bool)
        curve.positions = []
        equity_obj = quote_col.copy()
        for k in range(len(syms)):
            held_k = np.asarray([h[k] for h in helds], dtype=object)[seg]
            curve.positions.append(held_k.tolist())
            held_kf = np.asarray([float(h[k]) for h in helds])[seg]
            live = held_kf != 0
            if live.any():
                held_any |= live
                equity_f = equity_f + held_kf * closes_f[k]
                idx = np.flatnonzero(live)
                close_k = texts[k]  # a close made exact only where a position is held
                equity_obj[idx] = [
                    e + h * Decimal(close_k[i])
                    for i, e, h in zip(idx.tolist(), equity_obj[idx], held_k[idx], strict=True)
                ]
        equity = equity_obj.tolist()
        curve.equity = equity
        # floats of the exact equity, as the candle-by-candle run makes them (the metrics
        # of the two runs agree to the last digit): one conversion per run of one object
        curve._equity_f = _floats_of(equity)
        del equity_f
        curve._prices_f = closes_f
        curve._held = held_any

    def step(self, c: Candle) -> None:
        """One closed candle: fills, marks, the strategy's decisions."""
        self.step_all((c,))

    def step_all(self, group: Sequence[Candle]) -> None:
        """The candles of every symbol that close at one time: first each symbol's fills
        (the whole path of each candle trades before anything else happens, as a venue
        trades every symbol at once), then each candle's close, candle and signals."""
        for c in group:
            self.candles += 1
            self.first_open.setdefault(c.symbol, c.open)
            self.last_close[c.symbol] = c.close
            for event in self._fills_in(c):
                self._feed(event, self._fills_time(c))
        for c in group:
            self.portfolio.mark(c.symbol, c.close)
            self._feed(c, c.close_time)
            if self.strategy.wants_signals:
                for sig in self.signals.on_candle(c):
                    self._feed(sig, c.close_time)

    def _fills_time(self, c: Candle) -> int:
        """When what a candle's fills lead to is decided: at its last trade (the close
        vertex), as on a venue that has just printed it."""
        return vertex_times(c.open_time, c.close_time + 1 - c.open_time)[3]

    def _feed(self, msg: AnyMessage, now_ms: int) -> None:
        """One message to the risk engine (executions) and the strategy; intents are
        submitted at ``now_ms`` and their replies fed back the same way."""
        if self.risk is not None and isinstance(
            msg, OrderAccepted | OrderCanceled | OrderFilled | OrderFailed
        ):
            self.risk.on_execution(msg)
        intents = self.strategy.on_message(msg)
        if intents:
            for reply in self._submit_all(intents, now_ms):
                self._feed(reply, now_ms)

    def _record(self, time_ms: int) -> None:
        positions = self.portfolio.positions
        curve = self.equity
        curve.times.append(time_ms)
        curve.equity.append(self.portfolio.equity())
        for n, s in enumerate(self.symbols):
            curve.positions[n].append(positions[s].qty)
            curve.prices[n].append(positions[s].last_price)

    def result(self) -> BacktestResult:
        return BacktestResult(
            symbols=self.symbols,
            fills=self.fills,
            equity=self.equity,
            portfolio=self.portfolio,
            interval_ms=self.interval_ms,
            rejected=self.rejected,
            levels=self.levels,
            start_cash=self.start_cash,
            first_open=self.first_open,
            last_close=self.last_close,
            candles=self.candles,
            fill_settings=self.fill,
            orders={coid: o.state for coid, o in self.orders.items()},
        )

    # -- orders -------------------------------------------------------------------------------
    def _reject(self, intent: OrderIntent, reason: str, detail: str) -> OrderRejected:
        r = OrderRejected(
            id=deterministic_id("reject", intent.id),
            ts_event=intent.ts_event,
            ts_init=intent.ts_event,
            intent_id=intent.id,
            action=intent.action,
            symbol=intent.symbol,
            client_order_id=intent.client_order_id,
            reason=reason,
            detail=detail,
        )
        self.rejected.append(r)
        return r

    def _submit(self, intent: OrderIntent, now_ms: int) -> list[AnyMessage]:
        return self._submit_all((intent,), now_ms)

    def _submit_all(self, intents: Sequence[OrderIntent], now_ms: int) -> list[AnyMessage]:
        """The intents of one decision at ``now_ms``: the risk engine judges them all, then
        the venue takes the approved ones in order, then their replies go back. As in the
        services, risk sees none of these replies (a cancel's release of what its order
        held, say) before it has judged every intent of the decision."""
        replies: list[AnyMessage] = []
        approved: Sequence[OrderIntent] = intents
        if self.risk is not None:
            approved = []
            for intent in intents:
                verdict = self.risk.on_intent(intent, now_ms * 1_000_000)
                if isinstance(verdict, OrderRejected):
                    self.rejected.append(verdict)
                    replies.append(verdict)
                else:
                    approved.append(intent)
        for intent in approved:
            replies.extend(self._venue(intent, now_ms))
        return replies

    def _venue(self, intent: OrderIntent, now_ms: int) -> list[AnyMessage]:
        """One approved intent at the venue: its checks, the book, a fill on arrival."""
        book = self.book[intent.symbol]
        coid = intent.client_order_id
        ts = now_ms * 1_000_000
        if intent.action == "cancel":
            gone = book.pop(coid, None)
            if gone is None:
                return []
            self._move(gone, om.CancelRequested(ts_event=ts))
            self._move(gone, om.Canceled(ts_event=ts, venue_order_id=coid))
            return [
                OrderCanceled(
                    id=deterministic_id("canceled", coid),
                    ts_event=ts,
                    ts_init=ts,
                    symbol=intent.symbol,
                    client_order_id=coid,
                    venue_order_id=coid,
                    filled_qty=gone.filled,
                )
            ]
        if coid in self.orders:
            return [self._reject(intent, Rejections.DUPLICATE_ORDER, f"{coid} was placed before")]
        base, quote = self.assets[intent.symbol]
        pf = self.portfolio
        if intent.side == "BUY":
            committed = sum(
                (o.intent.price * o.remaining for o in book.values() if o.intent.side == "BUY"),
                ZERO,
            )
            # the venue locks the order's notional; a fee paid in the quote asset on top
            need = intent.price * intent.qty
            if self.fill.fee_in_quote:
                need *= ONE + self.fill.fees(intent.symbol)[1]
            if pf.balance(quote) - committed < need:
                return [
                    self._reject(
                        intent,
                        Rejections.INSUFFICIENT_BALANCE,
                        f"{quote} {pf.balance(quote) - committed} free, {need} needed",
                    )
                ]
        else:
            committed = sum((o.remaining for o in book.values() if o.intent.side == "SELL"), ZERO)
            if pf.balance(base) - committed < intent.qty:
                return [
                    self._reject(
                        intent,
                        Rejections.INSUFFICIENT_POSITION,
                        f"{base} {pf.balance(base) - committed} free, {intent.qty} to sell",
                    )
                ]
        order = _Order(
            intent,
            active_from_ms=now_ms + self.fill.latency_ms,
            state=om.submit(coid, intent.qty, ts_event=ts, deadline_ns=ts),
        )
        self.orders[coid] = order
        book[coid] = order
        if intent.order_type == OrderTypes.MARKET:
            return []
        if self.record_levels:
            self.levels[intent.symbol].append((now_ms, intent.side, intent.price))
        self._move(order, om.Accepted(ts_event=ts, venue_order_id=coid))
        replies: list[AnyMessage] = [
            OrderAccepted(
                id=deterministic_id("accepted", coid),
                ts_event=ts,
                ts_init=ts,
                symbol=intent.symbol,
                client_order_id=coid,
                venue_order_id=coid,
                side=intent.side,
                price=intent.price,
                qty=intent.qty,
            )
        ]
        last = self.last_close.get(intent.symbol)
        if not self.fill.latency_ms and last is not None:
            # it reaches the book now, where the last trade printed: a limit order that
            # crosses there takes liquidity at that price (as the venue fills it)
            order.arrived = True
            if would_cross_on_arrival(intent.side, intent.price, last):
                _maker, taker = self.fill.fees(intent.symbol)
                replies.append(self._fill(order, last, order.remaining, "taker", taker, now_ms))
                book.pop(coid, None)
        return replies

    # -- fills ----------------------------------------------------------------------------------
    def _fills_in(self, c: Candle) -> list[OrderFilled]:
        book = self.book[c.symbol]
        if not book:
            return []
        fs = self.fill
        maker, taker = fs.fees(c.symbol)
        through = fs.tick(c.symbol) if fs.queue == "through" else ZERO
        if _quiet(book, c, through):
            return []
        vertices = path_vertices(c.open, c.high, c.low, c.close)
        times = vertex_times(c.open_time, c.close_time + 1 - c.open_time)
        budget = c.volume * fs.volume_share if fs.volume_share is not None else None
        out: list[OrderFilled] = []
        for k in range(4):
            if not book:
                break
            at, now = vertices[k], times[k]
            prev = vertices[k - 1] if k else at
            lo, hi = (prev, at) if prev <= at else (at, prev)
            resting: list[tuple[Decimal, str, _Order]] = []
            arriving: list[tuple[_Order, Decimal]] = []
            for coid, o in book.items():
                if o.active_from_ms > now or o.remaining <= 0:
                    continue
                it = o.intent
                if not o.arrived:
                    # it reaches the book at this vertex: a market order, or a limit order
                    # that crosses the price there, takes liquidity; any other rests
                    o.arrived = True
                    if it.order_type == OrderTypes.MARKET:
                        slip = at * fs.slippage_bps / BPS
                        arriving.append((o, at + slip if it.side == "BUY" else at - slip))
                    elif would_cross_on_arrival(it.side, it.price, at):
                        arriving.append((o, at))
                    continue
                if it.order_type == OrderTypes.MARKET:
                    continue  # filled at arrival, only a volume cap leaves a rest: below
                if _reached(it, lo, hi, through):
                    # the path meets the nearest level first on its way from `prev`
                    resting.append((abs(it.price - prev), coid, o))
            resting.sort(key=lambda r: (r[0], r[1]))
            batch = [(o, o.intent.price, "maker") for _d, _c, o in resting]
            batch += [(o, px, "taker") for o, px in arriving]
            for o, px, liq in batch:
                if budget is None:
                    qty = o.remaining
                elif budget <= 0:
                    break
                else:
                    qty = min(o.remaining, budget)
                    budget -= qty
                rate = maker if liq == "maker" else taker
                out.append(self._fill(o, px, qty, liq, rate, now))  # type: ignore[arg-type]
                if o.remaining <= 0:
                    book.pop(o.intent.client_order_id, None)
        # a market order the volume cap left unfilled goes on at the next candle's open
        for o in book.values():
            if o.intent.order_type == OrderTypes.MARKET and o.arrived:
                o.arrived = False
        return out

    @staticmethod
    def _move(o: _Order, event: om.OrderEvent) -> None:
        """One event of an order through the order state machine. The backtest's venue
        sends each event once and in order: a refusal is a bug, and stops the run."""
        t = om.apply(o.state, event)
        if not t.applied:
            raise RuntimeError(
                f"{o.intent.client_order_id}: {event.kind} refused ({t.verdict}): {t.reason}"
            )
        o.state = t.state
        o.remaining = t.state.remaining_qty

    def _fill(
        self,
        o: _Order,
        price: Decimal,
        qty: Decimal,
        liquidity: Literal["maker", "taker"],
        rate: Decimal,
        now_ms: int,
    ) -> OrderFilled:
        it = o.intent
        base, quote = self.assets[it.symbol]
        in_quote = self.fill.fee_in_quote or it.side == "SELL"
        # the venue's commission rule; a SELL's is the quote-asset one
        fee = commission("SELL" if in_quote else "BUY", price, qty, rate, self.fill.fee_places)
        fee_asset = quote if in_quote else base
        self._trade_no += 1
        self._move(
            o,
            om.Fill(
                ts_event=now_ms * 1_000_000, qty=qty, price=price, trade_id=str(self._trade_no)
            ),
        )
        self.portfolio.apply_fill(it.symbol, it.side, price, qty, fee, fee_asset)
        self.fills.append(
            Fill(
                now_ms,
                it.symbol,
                it.side,
                price,
                qty,
                fee,
                fee_asset,
                liquidity,
                it.client_order_id,
            )
        )
        ts = now_ms * 1_000_000
        return OrderFilled(
            id=f"fill:{VENUE}:{it.symbol}:{self._trade_no}",
            ts_event=ts,
            ts_init=ts,
            symbol=it.symbol,
            client_order_id=it.client_order_id,
            venue_order_id=it.client_order_id,
            trade_id=str(self._trade_no),
            side=it.side,
            price=price,
            qty=qty,
            fee=fee,
            fee_asset=fee_asset,
            liquidity=liquidity,
            venue=VENUE,
        )


def run_backtest(
    strategy: Strategy,
    candles: Mapping[str, Sequence[Candle]],
    symbols: Mapping[str, tuple[str, str]],
    *,
    cash: Decimal,
    fill: FillSettings | None = None,
    signals: SignalEngine | None = None,
    interval_ms: int = 60_000,
    progress: Callable[[int], None] | None = None,
) -> BacktestResult:
    bt = Backtester(
        strategy, symbols, cash=cash, fill=fill, signals=signals, interval_ms=interval_ms
    )
    return bt.run(candles, progress)
