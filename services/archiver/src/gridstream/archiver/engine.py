"""The archiver's pure engine: buffering and partitioning, no I/O, no clock reads.

Entries are buffered per partition ``(kind, symbol, UTC date)``. The date comes from
the message itself (a candle's ``open_time``, a fill's ``ts_event``), so a replay
lands in the same partitions as live. The wiring passes a monotonic ``now`` so that
the engine can tell which buffers are due; it never reads a clock itself.

Idempotence: an entry id already buffered is ignored (a reclaimed or re-read entry),
and a flushed batch is named after its first and last entry ids, so a redelivered
batch rewrites the same file rather than adding a duplicate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Final, Literal

from gridstream.common import streams
from gridstream.common.messages import AnyMessage, Candle, OrderFilled, Tick
from gridstream.common.streams import Kind

#: What ``add`` did with an entry.
AddResult = Literal["buffered", "ignored", "duplicate"]

#: Message types archived, per stream kind.
ARCHIVED: Final[dict[Kind, type[AnyMessage]]] = {
    Kind.TICKS: Tick,
    Kind.CANDLES: Candle,
    Kind.EXECUTIONS: OrderFilled,
}


def parse_entry_id(entry_id: str) -> tuple[int, int]:
    """``"1700000000000-3"`` -> ``(1700000000000, 3)``: the order Redis uses."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def utc_date_of(msg: AnyMessage) -> str:
    """The UTC date (``YYYY-MM-DD``) a message is filed under."""
    seconds = msg.open_time / 1000 if isinstance(msg, Candle) else msg.ts_event / 1_000_000_000
    return datetime.fromtimestamp(seconds, tz=UTC).strftime("%Y-%m-%d")


@dataclass(frozen=True, slots=True, order=True)
class PartitionKey:
    """One archive partition: ``<kind>/symbol=<SYM>/date=<YYYY-MM-DD>``."""

    kind: Kind
    symbol: str
    date: str

    def folder(self) -> str:
        return f"{self.kind.value}/symbol={self.symbol}/date={self.date}"


@dataclass(frozen=True, slots=True)
class Item:
    """One buffered entry."""

    stream: str
    entry_id: str
    message: AnyMessage


@dataclass(frozen=True, slots=True)
class Batch:
    """A partition's buffered entries, in entry-id order, ready to be written."""

    key: PartitionKey
    items: tuple[Item, ...]

    @property
    def first_id(self) -> str:
        return self.items[0].entry_id

    @property
    def last_id(self) -> str:
        return self.items[-1].entry_id

    def object_key(self) -> str:
        """Relative path of the Parquet file: derived from the entry ids only."""
        return f"{self.key.folder()}/part-{self.first_id}-{self.last_id}.parquet"

    def entry_ids(self) -> dict[str, list[str]]:
        """Entry ids per stream (what the wiring acknowledges after the write)."""
        out: dict[str, list[str]] = {}
        for item in self.items:
            out.setdefault(item.stream, []).append(item.entry_id)
        return out


@dataclass(slots=True)
class _Buffer:
    started: float
    items: dict[str, Item] = field(default_factory=dict)


class ArchiveEngine:
    """Buffers archived messages per partition and says which buffers are due."""

    def __init__(self, *, flush_rows: int, flush_interval_s: float) -> None:
        if flush_rows < 1:
            raise ValueError("flush_rows must be >= 1")
        self.flush_rows = flush_rows
        self.flush_interval_s = flush_interval_s
        self._buffers: dict[PartitionKey, _Buffer] = {}
        # Highest entry id flushed per stream: the basis of the archived-up-to watermark.
        self._flushed: dict[str, tuple[int, int]] = {}

    # -- input ---------------------------------------------------------------------------
    def add(self, stream: str, entry_id: str, message: AnyMessage, now: float) -> AddResult:
        """Buffer one entry (``now`` is the wiring's monotonic clock, for flush timing)."""
        kind = _kind_of(stream)
        wanted = ARCHIVED.get(kind) if kind is not None else None
        if wanted is None or not isinstance(message, wanted):
            return "ignored"
        symbol = getattr(message, "symbol", "").upper()
        key = PartitionKey(kind, symbol, utc_date_of(message))  # type: ignore[arg-type]
        buf = self._buffers.get(key)
        if buf is None:
            buf = self._buffers[key] = _Buffer(started=now)
        if entry_id in buf.items:
            return "duplicate"
        buf.items[entry_id] = Item(stream, entry_id, message)
        return "buffered"

    # -- flushing ------------------------------------------------------------------------
    def due(self, now: float) -> list[PartitionKey]:
        """Partitions whose buffer is full or older than the flush interval."""
        return sorted(
            key
            for key, buf in self._buffers.items()
            if len(buf.items) >= self.flush_rows or now - buf.started >= self.flush_interval_s
        )

    def pending_keys(self) -> list[PartitionKey]:
        """Every partition with buffered entries (flushed all at shutdown)."""
        return sorted(self._buffers)

    def next_due_in(self, now: float) -> float | None:
        """Seconds until the oldest buffer is due (0 if one is due now), None if empty."""
        if not self._buffers:
            return None
        if self.due(now):
            return 0.0
        oldest = min(buf.started for buf in self._buffers.values())
        return max(0.0, oldest + self.flush_interval_s - now)

    def peek(self, key: PartitionKey) -> Batch:
        """The batch for a partition, without removing it (removed by :meth:`committed`)."""
        items = sorted(self._buffers[key].items.values(), key=lambda i: parse_entry_id(i.entry_id))
        return Batch(key, tuple(items))

    def committed(self, batch: Batch) -> None:
        """The batch is durably written: drop it from the buffer, advance the watermark."""
        buf = self._buffers.get(batch.key)
        if buf is not None:
            for item in batch.items:
                buf.items.pop(item.entry_id, None)
            if not buf.items:
                del self._buffers[batch.key]
        for item in batch.items:
            eid = parse_entry_id(item.entry_id)
            if eid > self._flushed.get(item.stream, (0, 0)):
                self._flushed[item.stream] = eid

    # -- watermarks ----------------------------------------------------------------------
    def archived_up_to(self, stream: str) -> str | None:
        """The entry id up to which ``stream`` is safely archived, or None if unknown.

        Conservative: when an older entry of the stream is still buffered (a date
        boundary flushed out of order), nothing is claimed until that one is written.
        """
        flushed = self._flushed.get(stream)
        if flushed is None:
            return None
        buffered = [
            parse_entry_id(i.entry_id)
            for buf in self._buffers.values()
            for i in buf.items.values()
            if i.stream == stream
        ]
        if buffered and min(buffered) < flushed:
            return None
        return f"{flushed[0]}-{flushed[1]}"

    @property
    def buffered_rows(self) -> int:
        return sum(len(buf.items) for buf in self._buffers.values())


def _kind_of(stream: str) -> Kind | None:
    try:
        return streams.parse(stream)[0]
    except ValueError:
        return None
