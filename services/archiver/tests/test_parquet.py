from __future__ import annotations

from decimal import Decimal

import pyarrow as pa
import pyarrow.parquet as pq
from archiver_factories import candle, fill

from gridstream.archiver import parquet
from gridstream.archiver.engine import Item
from gridstream.common.messages import Candle, OrderFilled
from gridstream.common.streams import Kind, stream


def test_candles_round_trip_with_exact_decimals(tmp_path) -> None:
    s = stream(Kind.CANDLES, "BTCUSDT")
    odd = candle(i=3, close=Decimal("0.000000000000000001"), volume=Decimal("123456789.123456789"))
    items = [Item(s, f"{i + 1}-0", candle(i=i)) for i in range(3)] + [Item(s, "9-0", odd)]
    data = parquet.to_parquet_bytes(items)
    back = parquet.read_messages([data], Candle)
    assert back == [i.message for i in items]
    # the representation survives too, not just the value
    assert str(back[0].open) == "64000.10000000"  # type: ignore[union-attr]
    assert str(back[0].quote_volume) == "1E-8"  # type: ignore[union-attr]
    path = tmp_path / "x.parquet"
    path.write_bytes(data)
    table = pq.read_table(path)
    assert table.schema.field("close").type == pa.string()
    assert table.schema.field("close").metadata == {parquet.META_TYPE: b"decimal"}
    assert table.schema.field("open_time").type == pa.int64()
    assert table.column("_entry_id").to_pylist() == ["1-0", "2-0", "3-0", "9-0"]


def test_fills_round_trip_and_readers_dedupe_by_message_id() -> None:
    s = stream(Kind.EXECUTIONS, "ETHUSDT")
    a = [Item(s, "1-0", fill("ETHUSDT", 0)), Item(s, "2-0", fill("ETHUSDT", 1))]
    b = [Item(s, "2-0", fill("ETHUSDT", 1)), Item(s, "3-0", fill("ETHUSDT", 2))]
    back = parquet.read_messages(
        [parquet.to_parquet_bytes(a), parquet.to_parquet_bytes(b)], OrderFilled
    )
    assert [m.id for m in back] == ["fill-ETHUSDT-0", "fill-ETHUSDT-1", "fill-ETHUSDT-2"]
    assert back[0] == fill("ETHUSDT", 0)


def test_polars_reads_the_files(tmp_path) -> None:
    import polars as pl

    s = stream(Kind.CANDLES, "BTCUSDT")
    path = tmp_path / "c.parquet"
    path.write_bytes(parquet.to_parquet_bytes([Item(s, "1-0", candle())]))
    df = pl.read_parquet(path)
    assert df["close"].to_list() == ["64050.99999999"]
    assert df["symbol"].to_list() == ["BTCUSDT"]
