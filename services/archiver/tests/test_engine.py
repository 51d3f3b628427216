from __future__ import annotations

import pytest
from archiver_factories import DAY_MS, T0_MS, accepted, candle, fill

from gridstream.archiver.engine import ArchiveEngine, PartitionKey, parse_entry_id, utc_date_of
from gridstream.common.streams import Kind, stream

CANDLES = stream(Kind.CANDLES, "BTCUSDT")
EXECS = stream(Kind.EXECUTIONS, "BTCUSDT")


def engine(rows: int = 100, interval: float = 60.0) -> ArchiveEngine:
    return ArchiveEngine(flush_rows=rows, flush_interval_s=interval)


def test_partitions_by_kind_symbol_and_utc_date() -> None:
    e = engine()
    assert e.add(CANDLES, "1-0", candle(i=0), 0.0) == "buffered"
    assert e.add(CANDLES, "2-0", candle(i=0, start_ms=T0_MS + DAY_MS), 0.0) == "buffered"
    assert e.add(EXECS, "3-0", fill(), 0.0) == "buffered"
    assert e.pending_keys() == [
        PartitionKey(Kind.CANDLES, "BTCUSDT", "2024-03-01"),
        PartitionKey(Kind.CANDLES, "BTCUSDT", "2024-03-02"),
        PartitionKey(Kind.EXECUTIONS, "BTCUSDT", "2024-03-01"),
    ]


def test_candle_date_is_its_open_time_not_its_close() -> None:
    last_of_day = candle(i=24 * 60 - 1)  # opens 23:59, closes at midnight
    assert utc_date_of(last_of_day) == "2024-03-01"


def test_other_execution_kinds_are_ignored_and_duplicates_dropped() -> None:
    e = engine()
    assert e.add(EXECS, "1-0", accepted(), 0.0) == "ignored"
    assert e.add(CANDLES, "2-0", candle(), 0.0) == "buffered"
    assert e.add(CANDLES, "2-0", candle(), 0.0) == "duplicate"
    assert e.buffered_rows == 1


def test_due_by_rows_and_by_interval() -> None:
    e = engine(rows=3, interval=10.0)
    for i in range(2):
        e.add(CANDLES, f"{i + 1}-0", candle(i=i), 100.0)
    assert e.due(105.0) == []
    assert e.next_due_in(105.0) == pytest.approx(5.0)
    e.add(CANDLES, "3-0", candle(i=2), 105.0)
    assert e.due(105.0) == [PartitionKey(Kind.CANDLES, "BTCUSDT", "2024-03-01")]
    e2 = engine(rows=3, interval=10.0)
    e2.add(CANDLES, "1-0", candle(), 100.0)
    assert e2.due(109.9) == []
    assert len(e2.due(110.0)) == 1


def test_batch_is_in_entry_id_order_and_named_after_its_ids() -> None:
    e = engine()
    e.add(CANDLES, "10-1", candle(i=1), 0.0)
    e.add(CANDLES, "9-5", candle(i=0), 0.0)
    e.add(CANDLES, "10-0", candle(i=2), 0.0)
    batch = e.peek(e.pending_keys()[0])
    assert [i.entry_id for i in batch.items] == ["9-5", "10-0", "10-1"]
    assert batch.object_key() == "candles/symbol=BTCUSDT/date=2024-03-01/part-9-5-10-1.parquet"
    assert batch.entry_ids() == {CANDLES: ["9-5", "10-0", "10-1"]}


def test_watermark_waits_for_older_buffered_entries() -> None:
    e = engine()
    e.add(CANDLES, "5-0", candle(i=0), 0.0)
    e.add(CANDLES, "6-0", candle(i=0, start_ms=T0_MS + DAY_MS), 0.0)
    assert e.archived_up_to(CANDLES) is None
    day2 = PartitionKey(Kind.CANDLES, "BTCUSDT", "2024-03-02")
    e.committed(e.peek(day2))
    assert e.archived_up_to(CANDLES) is None  # 5-0 is older and still buffered
    e.committed(e.peek(PartitionKey(Kind.CANDLES, "BTCUSDT", "2024-03-01")))
    assert e.archived_up_to(CANDLES) == "6-0"
    assert e.buffered_rows == 0


def test_parse_entry_id_orders_numerically() -> None:
    assert parse_entry_id("10-0") > parse_entry_id("9-99")
