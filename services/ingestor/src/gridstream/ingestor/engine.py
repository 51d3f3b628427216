"""The ingestor's pure engine: frames in, ticks / closed candles / gaps out.

No I/O and no clock: event time comes from the frames, ``ts_init`` from the caller.

State per (symbol, interval) is the *watermark*: the open time of the last closed
candle handed out. Per (symbol, event type) it keeps the last trade id handed out.

* Duplicates are dropped: a candle whose open time is at or below the watermark, a
  trade whose id is at or below the last one seen.
* A still-forming candle (``k.x`` false) is never handed out.
* A closed candle that opens later than ``watermark + interval`` reveals a gap. The
  engine then returns a :class:`Gap` *before* the candle; the wiring fills the gap
  from REST (:meth:`IngestEngine.fill_gap`) and publishes the filled candles before
  the candle that revealed it.
* At start and after every reconnect the wiring sets the watermark from Postgres
  (:meth:`IngestEngine.set_watermark`) and feeds the REST catch-up through
  :meth:`IngestEngine.on_backfill`.
* A range that REST confirms has no candles although later ones exist is an exchange
  halt (:func:`find_halts`): recorded, never filled with invented candles, and the
  watermark moves past it.
* Trades also build candles (:class:`~gridstream.ingestor.candles.CandleBuilder`) of the
  ``check_interval``; each closed exchange kline of that interval is compared with the
  candle built from the same minute's trades and the result handed out as a
  :class:`CandleCheck` (the exchange's kline is what is published either way).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from gridstream.common.binance.market import ParsedFrame, interval_ms, parse_frame
from gridstream.common.messages import Candle, Tick
from gridstream.ingestor.candles import BuiltCandle, CandleBuilder, differences


@dataclass(frozen=True, slots=True)
class Gap:
    """Closed candles missing between the watermark and a newer closed candle.

    ``first_open_time`` .. ``last_open_time`` are the open times of the missing
    candles, both inclusive.
    """

    symbol: str
    interval: str
    first_open_time: int
    last_open_time: int

    @property
    def missing(self) -> int:
        """How many candles the range spans."""
        return (self.last_open_time - self.first_open_time) // interval_ms(self.interval) + 1


@dataclass(frozen=True, slots=True)
class Halt:
    """Open times (both inclusive) for which the venue confirms there are no candles."""

    symbol: str
    interval: str
    first_open_time: int
    last_open_time: int

    @property
    def candles(self) -> int:
        return (self.last_open_time - self.first_open_time) // interval_ms(self.interval) + 1


@dataclass(frozen=True, slots=True)
class CandleCheck:
    """An exchange kline compared with the candle built from the same interval's trades."""

    symbol: str
    interval: str
    open_time: int
    differences: tuple[str, ...]

    @property
    def agrees(self) -> bool:
        return not self.differences


Output = Tick | Candle | Gap | CandleCheck

#: Built candles kept per symbol, waiting for the exchange kline of the same minute.
BUILT_KEEP = 8


def find_halts(
    symbol: str, interval: str, first_open_time: int, last_open_time: int, candles: Iterable[Candle]
) -> list[Halt]:
    """The ranges inside ``first..last`` (open times, inclusive) with no candle in ``candles``.

    Call it only for a range the venue has *closed*: every open time up to ``last`` is in
    the past and REST answered for all of it (a newer candle exists), so a hole in the
    answer means the exchange has no candle there.
    """
    step = interval_ms(interval)
    opens = sorted(
        {
            c.open_time
            for c in candles
            if c.symbol == symbol
            and c.interval == interval
            and first_open_time <= c.open_time <= last_open_time
        }
    )
    out: list[Halt] = []
    expect = first_open_time
    for t in [*opens, last_open_time + step]:
        if t > expect:
            out.append(Halt(symbol, interval, expect, t - step))
        expect = t + step
    return out


class IngestEngine:
    """Deduplicates market data and detects candle gaps; see the module docstring."""

    def __init__(self, check_interval: str | None = "1m") -> None:
        self._watermarks: dict[tuple[str, str], int] = {}
        self._last_trade: dict[tuple[str, str], int] = {}
        self.builder = CandleBuilder(check_interval) if check_interval else None
        self._built: dict[str, dict[int, Candle]] = {}
        self.duplicates = 0
        self.ignored = 0

    def reset_builder(self) -> None:
        """After a reconnect the trades of the bucket in progress may be incomplete."""
        if self.builder is not None:
            self.builder.reset()
            self._built.clear()

    # -- state ---------------------------------------------------------------------------
    def watermark(self, symbol: str, interval: str) -> int | None:
        """Open time of the last closed candle handed out (or set), if any."""
        return self._watermarks.get((symbol.upper(), interval))

    def set_watermark(self, symbol: str, interval: str, open_time: int | None) -> None:
        """Reset the watermark (from Postgres at (re)connect); ``None`` forgets it."""
        key = (symbol.upper(), interval)
        if open_time is None:
            self._watermarks.pop(key, None)
        else:
            self._watermarks[key] = open_time

    # -- input ---------------------------------------------------------------------------
    def on_frame(self, frame: bytes | str, *, ts_init: int | None = None) -> list[Output]:
        """One websocket frame -> what to publish, in order.

        Raises :class:`~gridstream.common.binance.market.MalformedFrame` for a frame
        that cannot be read (the wiring dead-letters it and goes on).
        """
        return self.on_parsed(parse_frame(frame, ts_init=ts_init))

    def on_parsed(self, parsed: ParsedFrame) -> list[Output]:
        """An already parsed frame -> what to publish, in order."""
        msg = parsed.message
        if msg is None:
            self.ignored += 1
            return []
        if isinstance(msg, Tick):
            return self._on_tick(msg, parsed.event, parsed.trades)
        return self._on_candle(msg)

    def _on_tick(self, tick: Tick, event: str, trades: int = 1) -> list[Output]:
        key = (tick.symbol, event)
        last = self._last_trade.get(key)
        if last is not None and tick.trade_id <= last:
            self.duplicates += 1
            return []
        self._last_trade[key] = tick.trade_id
        if self.builder is not None:
            self._keep(self.builder.on_tick(tick, trades))
        return [tick]

    def _keep(self, built: Iterable[BuiltCandle]) -> None:
        for b in built:
            c = b.candle
            kept = self._built.setdefault(c.symbol, {})
            kept[c.open_time] = c
            while len(kept) > BUILT_KEEP:
                del kept[min(kept)]

    def _check(self, candle: Candle) -> list[Output]:
        if self.builder is None or candle.interval != self.builder.interval:
            return []
        self._keep(self.builder.advance(candle.symbol, candle.close_time + 1))
        built = self._built.get(candle.symbol, {}).pop(candle.open_time, None)
        if built is None:
            return []  # no complete trade history for this minute (just (re)connected)
        return [
            CandleCheck(
                candle.symbol, candle.interval, candle.open_time, tuple(differences(built, candle))
            )
        ]

    def _on_candle(self, candle: Candle) -> list[Output]:
        key = (candle.symbol, candle.interval)
        last = self._watermarks.get(key)
        if last is not None and candle.open_time <= last:
            self.duplicates += 1
            return []
        self._watermarks[key] = candle.open_time
        step = interval_ms(candle.interval)
        checks = self._check(candle)
        if last is not None and candle.open_time > last + step:
            gap = Gap(candle.symbol, candle.interval, last + step, candle.open_time - step)
            return [gap, candle, *checks]
        return [candle, *checks]

    def on_backfill(self, candles: Iterable[Candle]) -> list[Candle]:
        """Closed candles from REST (catch-up) -> those newer than the watermark, in order.

        REST is the truth for what exists: a hole in its answer (an exchange halt) is
        not a gap to fill again. The watermark advances to the newest candle kept.
        """
        out: list[Candle] = []
        for c in sorted(candles, key=lambda c: c.open_time):
            key = (c.symbol, c.interval)
            last = self._watermarks.get(key)
            if last is not None and c.open_time <= last:
                self.duplicates += 1
                continue
            self._watermarks[key] = c.open_time
            out.append(c)
        return out

    @staticmethod
    def fill_gap(gap: Gap, candles: Iterable[Candle]) -> list[Candle]:
        """The REST candles that belong in ``gap``, in order, each open time once."""
        seen: set[int] = set()
        out: list[Candle] = []
        for c in sorted(candles, key=lambda c: c.open_time):
            if (
                c.symbol == gap.symbol
                and c.interval == gap.interval
                and gap.first_open_time <= c.open_time <= gap.last_open_time
                and c.open_time not in seen
            ):
                seen.add(c.open_time)
                out.append(c)
        return out
