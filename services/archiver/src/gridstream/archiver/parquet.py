"""Messages <-> Parquet bytes.

Column types are derived from the message Struct's annotations:

* ``int`` -> int64, ``float`` -> float64, ``str`` / ``Literal[...]`` -> string;
* ``Decimal`` -> **string**, holding ``str(Decimal)`` exactly as it travelled on the wire.
  Chosen over decimal128 because prices and quantities of different symbols have
  different scales (``"0.00001000"`` vs ``"64000.01"``), a fixed-scale decimal128 column
  would rescale them (losing the original representation) or overflow, and a string
  is exact and read by every tool. Such columns carry the field metadata
  ``gridstream.type = decimal`` so a reader knows to parse them with ``Decimal``.

Every file also has the columns ``_stream`` and ``_entry_id`` (the Redis entry), and
the message's own ``id`` column: readers deduplicate by it (``read_messages`` does).
"""

from __future__ import annotations

import hashlib
import io
import typing
from collections.abc import Iterable, Sequence
from decimal import Decimal
from typing import Any, Final

import msgspec
import pyarrow as pa
import pyarrow.parquet as pq

from gridstream.common.messages import AnyMessage

from .engine import Item

META_TYPE: Final = b"gridstream.type"
META_KIND: Final = b"gridstream.kind"
COL_STREAM: Final = "_stream"
COL_ENTRY: Final = "_entry_id"


def _arrow_type(tp: Any) -> tuple[pa.DataType, bool]:
    """(arrow type, is_decimal) of one annotation."""
    if tp is Decimal:
        return pa.string(), True
    if tp is int:
        return pa.int64(), False
    if tp is float:
        return pa.float64(), False
    if tp is str or typing.get_origin(tp) is typing.Literal:
        return pa.string(), False
    if tp is bool:
        return pa.bool_(), False
    raise TypeError(f"no Parquet mapping for {tp!r}")


def schema_for(cls: type[msgspec.Struct]) -> pa.Schema:
    """The Parquet schema of one message type."""
    hints = typing.get_type_hints(cls)
    fields = [pa.field(COL_STREAM, pa.string(), False), pa.field(COL_ENTRY, pa.string(), False)]
    for f in msgspec.structs.fields(cls):
        arrow, is_decimal = _arrow_type(hints[f.name])
        meta = {META_TYPE: b"decimal"} if is_decimal else None
        fields.append(pa.field(f.name, arrow, False, metadata=meta))
    tag = msgspec.inspect.type_info(cls).tag  # type: ignore[attr-defined]
    return pa.schema(fields, metadata={META_KIND: str(tag).encode()})


def to_table(items: Sequence[Item]) -> pa.Table:
    """One table from items of a single message type."""
    if not items:
        raise ValueError("nothing to write")
    cls = type(items[0].message)
    schema = schema_for(cls)
    names = [f.name for f in msgspec.structs.fields(cls)]
    columns: dict[str, list[Any]] = {COL_STREAM: [], COL_ENTRY: []}
    for n in names:
        columns[n] = []
    for item in items:
        if type(item.message) is not cls:
            raise TypeError("a batch holds one message type")
        columns[COL_STREAM].append(item.stream)
        columns[COL_ENTRY].append(item.entry_id)
        for n in names:
            value = getattr(item.message, n)
            columns[n].append(str(value) if isinstance(value, Decimal) else value)
    return pa.Table.from_pydict(columns, schema=schema)


def to_parquet_bytes(items: Sequence[Item]) -> bytes:
    """The Parquet file for a batch (zstd compressed)."""
    sink = io.BytesIO()
    pq.write_table(to_table(items), sink, compression="zstd")
    return sink.getvalue()


def sha256_sidecar(data: bytes, name: str) -> bytes:
    """The ``.sha256`` sidecar body, in ``sha256sum`` format."""
    return f"{hashlib.sha256(data).hexdigest()}  {name}\n".encode()


def read_rows(data: bytes) -> list[dict[str, Any]]:
    """Rows of one Parquet file as dicts, Decimal columns parsed back to Decimal."""
    table = pq.read_table(io.BytesIO(data))
    decimals = {
        f.name for f in table.schema if f.metadata and f.metadata.get(META_TYPE) == b"decimal"
    }
    rows: list[dict[str, Any]] = table.to_pylist()
    for row in rows:
        for name in decimals:
            row[name] = Decimal(row[name])
    return rows


def read_messages(files: Iterable[bytes], cls: type[AnyMessage]) -> list[AnyMessage]:
    """Messages of several files, deduplicated by message id, in entry-id order."""
    seen: dict[str, tuple[tuple[int, int], AnyMessage]] = {}
    for data in files:
        for row in read_rows(data):
            entry = row.pop(COL_ENTRY)
            row.pop(COL_STREAM)
            ms, _, seq = entry.partition("-")
            msg = msgspec.convert(row, cls)
            seen.setdefault(msg.id, ((int(ms), int(seq or 0)), msg))
    return [m for _, m in sorted(seen.values(), key=lambda pair: pair[0])]
