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
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from gridstream.common.binance.market import ParsedFrame, interval_ms, parse_frame
from gridstream.common.messages import Candle, Tick


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


Output = Tick | Candle | Gap


class IngestEngine:
    """Deduplicates market data and detects candle gaps; see the module docstring."""

    def __init__(self) -> None:
        self._watermarks: dict[tuple[str, str], int] = {}
        self._last_trade: dict[tuple[str, str], int] = {}
        self.duplicates = 0
        self.ignored = 0

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
            return self._on_tick(msg, parsed.event)
        return self._on_candle(msg)

    def _on_tick(self, tick: Tick, event: str) -> list[Output]:
        key = (tick.symbol, event)
        last = self._last_trade.get(key)
        if last is not None and tick.trade_id <= last:
            self.duplicates += 1
            return []
        self._last_trade[key] = tick.trade_id
        return [tick]

    def _on_candle(self, candle: Candle) -> list[Output]:
        key = (candle.symbol, candle.interval)
        last = self._watermarks.get(key)
        if last is not None and candle.open_time <= last:
            self.duplicates += 1
            return []
        self._watermarks[key] = candle.open_time
        step = interval_ms(candle.interval)
        if last is not None and candle.open_time > last + step:
            gap = Gap(candle.symbol, candle.interval, last + step, candle.open_time - step)
            return [gap, candle]
        return [candle]

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
