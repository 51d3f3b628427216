"""History into Postgres: ``gridstream backfill`` (REST klines) and ``gridstream import`` (files).

Both write the ``candles`` table the ingestor writes, in chunks: each chunk is one COPY into
a staging table and one ``INSERT ... ON CONFLICT`` (:func:`gridstream.common.db.copy_upsert`)
in its own transaction, never row by row and never ``executemany``.

* ``backfill`` resumes where it stopped: per symbol it starts after ``max(open_time)`` already
  stored inside the requested range, pages REST klines by 1000 inside the request-weight
  budget (``X-MBX-USED-WEIGHT-1M``; 429/418 respected), keeps only closed candles (venue
  clock) and commits every chunk, so an interrupted run loses at most one chunk of work.
* ``import`` reads the repository's ``data/klines`` CSV layout (header ``open_time_ms,...``),
  Binance's headerless kline CSV (data.binance.vision, ms or us timestamps; ``.csv``,
  ``.csv.gz`` or ``.zip``) or Parquet (``open_time[_ms]``, ``open`` ... ``volume`` and
  optionally ``close_time[_ms]``, ``quote_volume``, ``trades``, ``symbol``, ``interval``).
  Symbol and interval come from the file name (``BTCUSDT-1m...``) unless given.
"""

from __future__ import annotations

import csv
import gzip
import io
import re
import sys
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Final, TextIO

import aiohttp
import asyncpg
from tqdm import tqdm

from gridstream.common import db
from gridstream.common.binance import market as bm

CANDLES_TABLE: Final = db.CANDLES_TABLE
COLUMNS: Final = db.CANDLE_COLUMNS
KEY: Final = db.CANDLE_KEY
UPDATE: Final = db.CANDLE_UPDATE
CHUNK_ROWS: Final = 50_000
SOURCE_REST: Final = "rest"
SOURCE_FILE: Final = "file"
#: Timestamps above this are microseconds (data.binance.vision spot files since 2025).
_US_THRESHOLD: Final = 10**14
_NAME = re.compile(r"^([A-Za-z0-9]+)-(\d+[smhdw])(?:[-_.]|$)")

Record = tuple[Any, ...]


class ImportError_(ValueError):
    """A file that cannot be imported; the message names the file and the row."""


def parse_time(value: str) -> int:
    """Epoch ms, or an ISO date/time (UTC unless it says otherwise) -> epoch ms."""
    s = value.strip()
    if s.isdigit():
        return int(s)
    try:
        dt = datetime.fromisoformat(s.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"not epoch ms or an ISO date/time: {value!r}") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp() * 1000)


def _ms(value: int) -> int:
    return value // 1000 if value > _US_THRESHOLD else value


def _dec(value: object, what: str) -> Decimal:
    if isinstance(value, float):
        value = repr(value)
    try:
        d = Decimal(str(value)) if not isinstance(value, Decimal) else value
    except InvalidOperation:
        raise ValueError(f"{what}: not a number: {value!r}") from None
    if not d.is_finite():
        raise ValueError(f"{what}: not finite: {value!r}")
    return d


def candle_record(
    symbol: str,
    interval: str,
    open_time: int,
    o: object,
    h: object,
    lo: object,
    c: object,
    v: object,
    *,
    close_time: int | None = None,
    quote_volume: object = None,
    trades: object = None,
    source: str = SOURCE_FILE,
) -> Record:
    """One ``candles`` row, validated (decimals finite, low <= open/close <= high)."""
    step = bm.interval_ms(interval)
    op, hi, low, cl, vol = (
        _dec(o, "open"),
        _dec(h, "high"),
        _dec(lo, "low"),
        _dec(c, "close"),
        _dec(v, "volume"),
    )
    if not (low <= op <= hi and low <= cl <= hi) or vol < 0:
        raise ValueError(
            f"inconsistent candle at {open_time}: O {op} H {hi} L {low} C {cl} V {vol}"
        )
    qv = Decimal(0) if quote_volume in (None, "") else _dec(quote_volume, "quote_volume")
    n = 0 if trades in (None, "") else int(str(trades))
    ct = open_time + step - 1 if close_time is None else close_time
    return (symbol, interval, open_time, ct, op, hi, low, cl, vol, qv, n, source)


def _chunks(records: Iterable[Record], size: int) -> Iterator[list[Record]]:
    chunk: list[Record] = []
    for r in records:
        chunk.append(r)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


async def upsert_chunk(conn: asyncpg.Connection, rows: Sequence[Record], *, update: bool) -> int:
    """One chunk: COPY into staging + one upsert, in one transaction; rows written."""
    async with conn.transaction():
        return await db.copy_upsert(
            conn, CANDLES_TABLE, COLUMNS, rows, key=KEY, update=UPDATE if update else ()
        )


# -- import -------------------------------------------------------------------------------


def symbol_interval_from_name(path: Path) -> tuple[str, str] | None:
    m = _NAME.match(path.name)
    if m is None or m.group(2) not in bm.INTERVAL_MS:
        return None
    return m.group(1).upper(), m.group(2)


def _open_text(path: Path) -> TextIO:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    if path.suffix == ".zip":
        zf = zipfile.ZipFile(path)
        members = [n for n in zf.namelist() if n.endswith(".csv")]
        if len(members) != 1:
            raise ImportError_(f"{path}: expected one .csv inside the zip, found {members}")
        return io.TextIOWrapper(zf.open(members[0]), encoding="utf-8", newline="")
    return path.open("r", encoding="utf-8", newline="")


def read_csv(path: Path, symbol: str, interval: str) -> Iterator[Record]:
    """Rows of a data/klines CSV (with header) or a headerless Binance kline CSV."""
    with _open_text(path) as fh:
        reader = csv.reader(fh)
        first = next(reader, None)
        if first is None:
            return
        header: dict[str, int] | None = None
        if first and not first[0].strip().isdigit():
            header = {name.strip(): i for i, name in enumerate(first)}
            rows: Iterable[list[str]] = reader
            line0 = 2
        else:
            rows = _prepend(first, reader)
            line0 = 1
        for line, row in enumerate(rows, start=line0):
            if not row:
                continue
            try:
                yield _csv_record(row, header, symbol, interval)
            except (ValueError, IndexError, KeyError) as exc:
                raise ImportError_(f"{path}:{line}: {exc}") from None


def _prepend(first: list[str], rest: Iterable[list[str]]) -> Iterator[list[str]]:
    yield first
    yield from rest


def _csv_record(
    row: list[str], header: dict[str, int] | None, symbol: str, interval: str
) -> Record:
    if header is None:  # Binance: open time, O, H, L, C, V, close time, quote volume, trades...
        return candle_record(
            symbol,
            interval,
            _ms(int(row[0])),
            row[1],
            row[2],
            row[3],
            row[4],
            row[5],
            close_time=_ms(int(row[6])) if len(row) > 6 and row[6] else None,
            quote_volume=row[7] if len(row) > 7 else None,
            trades=row[8] if len(row) > 8 else None,
        )

    def col(*names: str) -> str | None:
        for n in names:
            i = header.get(n)
            if i is not None and i < len(row):
                return row[i]
        return None

    open_time = col("open_time_ms", "open_time")
    if open_time is None:
        raise KeyError("no open_time_ms/open_time column")
    close_time = col("close_time_ms", "close_time")
    return candle_record(
        symbol,
        interval,
        _ms(int(open_time)),
        col("open"),
        col("high"),
        col("low"),
        col("close"),
        col("volume"),
        close_time=_ms(int(close_time)) if close_time else None,
        quote_volume=col("quote_volume", "quote_asset_volume"),
        trades=col("trades", "count", "number_of_trades"),
    )


def read_parquet(path: Path, symbol: str | None, interval: str | None) -> Iterator[Record]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    names = set(pf.schema_arrow.names)

    def pick(*cands: str) -> str | None:
        return next((c for c in cands if c in names), None)

    ot_col = pick("open_time_ms", "open_time")
    if ot_col is None:
        raise ImportError_(f"{path}: no open_time_ms/open_time column")
    ct_col = pick("close_time_ms", "close_time")
    qv_col = pick("quote_volume")
    n_col = pick("trades")
    for batch in pf.iter_batches(batch_size=CHUNK_ROWS):
        cols = batch.to_pydict()
        for i in range(batch.num_rows):
            sym = str(cols["symbol"][i]).upper() if "symbol" in cols else symbol
            iv = str(cols["interval"][i]) if "interval" in cols else interval
            if sym is None or iv is None:
                raise ImportError_(f"{path}: give --symbol/--interval (not in name or columns)")
            ot = cols[ot_col][i]
            ot_ms = _ms(int(ot.timestamp() * 1000)) if isinstance(ot, datetime) else _ms(int(ot))
            try:
                yield candle_record(
                    sym,
                    iv,
                    ot_ms,
                    cols["open"][i],
                    cols["high"][i],
                    cols["low"][i],
                    cols["close"][i],
                    cols["volume"][i],
                    close_time=_ms(int(cols[ct_col][i])) if ct_col else None,
                    quote_volume=cols[qv_col][i] if qv_col else None,
                    trades=cols[n_col][i] if n_col else None,
                )
            except (ValueError, KeyError) as exc:
                raise ImportError_(f"{path}: row {i}: {exc}") from None


def read_file(
    path: Path, symbol: str | None = None, interval: str | None = None
) -> Iterator[Record]:
    """The candle rows of one file (CSV, gzip/zip CSV, or Parquet)."""
    named = symbol_interval_from_name(path)
    sym = symbol.upper() if symbol else (named[0] if named else None)
    iv = interval or (named[1] if named else None)
    if path.suffix == ".parquet":
        return read_parquet(path, sym, iv)
    if sym is None or iv is None:
        raise ImportError_(f"{path}: give --symbol/--interval (not in the file name)")
    bm.interval_ms(iv)
    return read_csv(path, sym, iv)


@dataclass
class ImportResult:
    path: Path
    rows: int
    written: int


async def import_files(
    database_url: str,
    paths: Sequence[Path],
    *,
    symbol: str | None = None,
    interval: str | None = None,
    update: bool = False,
    chunk_rows: int = CHUNK_ROWS,
    progress: bool = True,
) -> list[ImportResult]:
    """Load candle files into Postgres, chunk by chunk (COPY + one upsert each)."""
    out: list[ImportResult] = []
    conn = await asyncpg.connect(database_url)
    try:
        await db.migrate(conn)
        for path in paths:
            rows = written = 0
            with tqdm(desc=path.name, unit=" rows", disable=not progress, file=sys.stderr) as bar:
                for chunk in _chunks(read_file(path, symbol, interval), chunk_rows):
                    written += await upsert_chunk(conn, chunk, update=update)
                    rows += len(chunk)
                    bar.update(len(chunk))
            out.append(ImportResult(path, rows, written))
    finally:
        await conn.close()
    return out


# -- backfill -----------------------------------------------------------------------------


@dataclass
class BackfillResult:
    symbol: str
    resumed_from: int | None
    fetched: int
    written: int


async def stored_max(
    conn: asyncpg.Connection, symbol: str, interval: str, from_ms: int, to_ms: int
) -> int | None:
    value = await conn.fetchval(
        f"SELECT max(open_time) FROM {CANDLES_TABLE} WHERE symbol = $1 AND interval = $2"
        " AND open_time BETWEEN $3 AND $4",
        symbol,
        interval,
        from_ms,
        to_ms,
    )
    return None if value is None else int(value)


async def backfill(
    database_url: str,
    rest_url: str,
    symbols: Sequence[str],
    interval: str,
    from_ms: int,
    to_ms: int,
    *,
    chunk_rows: int = CHUNK_ROWS,
    progress: bool = True,
    limiter: bm.RestLimiter | None = None,
    timeout_s: float = 30.0,
) -> list[BackfillResult]:
    """Closed candles with ``from_ms <= open_time <= to_ms`` from REST into Postgres."""
    step = bm.interval_ms(interval)
    if to_ms < from_ms:
        raise ValueError("--to is before --from")
    limiter = limiter or bm.RestLimiter()
    chunk_span = max(1, chunk_rows // bm.KLINES_MAX_LIMIT) * bm.KLINES_MAX_LIMIT * step
    results: list[BackfillResult] = []
    conn = await asyncpg.connect(database_url)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    try:
        await db.migrate(conn)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            for raw_symbol in symbols:
                symbol = raw_symbol.upper()
                done = await stored_max(conn, symbol, interval, from_ms, to_ms)
                start = from_ms if done is None else done + step
                first = from_ms - from_ms % step
                total = max(0, (to_ms - first) // step + 1)
                fetched = written = 0
                with tqdm(
                    total=total,
                    initial=min(total, max(0, (start - first) // step)),
                    desc=f"{symbol} {interval}",
                    unit=" candles",
                    disable=not progress,
                    file=sys.stderr,
                ) as bar:
                    cursor = start
                    while cursor <= to_ms:
                        end = min(to_ms, cursor + chunk_span - 1)
                        now = await bm.fetch_server_time(session, rest_url, limiter=limiter)
                        candles = await bm.fetch_klines(
                            session, rest_url, symbol, interval, cursor, end, limiter=limiter
                        )
                        closed = [c for c in candles if c.close_time < now]
                        if closed:
                            written += await upsert_chunk(
                                conn,
                                [_from_candle(c) for c in closed],
                                update=False,
                            )
                        fetched += len(closed)
                        if len(closed) < len(candles) or end >= now:
                            bar.update((min(end, now) - cursor) // step + 1 if now > cursor else 0)
                            break  # reached the venue's present: nothing closed beyond
                        bar.update((end - cursor) // step + 1)
                        cursor = end + 1
                results.append(BackfillResult(symbol, done, fetched, written))
    finally:
        await conn.close()
    return results


def _from_candle(c: Any) -> Record:
    return (
        c.symbol,
        c.interval,
        c.open_time,
        c.close_time,
        c.open,
        c.high,
        c.low,
        c.close,
        c.volume,
        c.quote_volume,
        c.trades,
        SOURCE_REST,
    )


# -- command line ---------------------------------------------------------------------------


def cmd_backfill(args: Any) -> int:
    import asyncio
    import os

    from gridstream.common.settings import CommonSettings, env_name

    from .common import database_url, ensure_database

    rest_url = (
        args.rest_url
        or os.environ.get(env_name("venue_rest_url"))
        or CommonSettings().venue_rest_url
    )
    symbols = [s for part in args.symbols for s in part.split(",") if s]
    try:
        from_ms, to_ms = parse_time(args.from_), parse_time(args.to)
        bm.interval_ms(args.interval)
    except ValueError as exc:
        print(f"gridstream backfill: {exc}", file=sys.stderr)
        return 2
    limiter = bm.RestLimiter(args.weight_limit, fraction=args.weight_fraction)

    async def go() -> list[BackfillResult]:
        url = database_url()
        await ensure_database(url)
        return await backfill(
            url,
            rest_url,
            symbols,
            args.interval,
            from_ms,
            to_ms,
            chunk_rows=args.chunk_rows,
            progress=not args.quiet,
            limiter=limiter,
        )

    for r in asyncio.run(go()):
        resumed = "" if r.resumed_from is None else f" (resumed after {r.resumed_from})"
        print(
            f"{r.symbol} {args.interval}: {r.fetched} candle(s) fetched, {r.written} new{resumed}"
        )
    return 0


def cmd_import(args: Any) -> int:
    import asyncio

    from .common import database_url, ensure_database

    async def go() -> list[ImportResult]:
        url = database_url()
        await ensure_database(url)
        return await import_files(
            url,
            [Path(p) for p in args.files],
            symbol=args.symbol,
            interval=args.interval,
            update=args.update,
            chunk_rows=args.chunk_rows,
            progress=not args.quiet,
        )

    try:
        results = asyncio.run(go())
    except (ImportError_, ValueError, OSError) as exc:
        print(f"gridstream import: {exc}", file=sys.stderr)
        return 1
    for r in results:
        print(f"{r.path}: {r.rows} row(s) read, {r.written} written")
    return 0


def add_parsers(sub: Any) -> None:
    """Register ``backfill`` and ``import`` on the ``gridstream`` command's subparsers."""
    bf = sub.add_parser("backfill", help="fill Postgres with closed candles from REST klines")
    bf.add_argument("--symbols", nargs="+", required=True, help="BTCUSDT ETHUSDT or A,B")
    bf.add_argument("--interval", default="1m")
    bf.add_argument("--from", dest="from_", required=True, help="epoch ms or ISO date/time (UTC)")
    bf.add_argument("--to", required=True, help="epoch ms or ISO date/time (UTC), inclusive")
    bf.add_argument("--rest-url", help="default GS_VENUE_REST_URL")
    bf.add_argument("--chunk-rows", type=int, default=CHUNK_ROWS)
    bf.add_argument("--weight-limit", type=int, default=bm.DEFAULT_WEIGHT_LIMIT)
    bf.add_argument("--weight-fraction", type=float, default=0.8)
    bf.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    bf.set_defaults(fn=cmd_backfill)

    im = sub.add_parser("import", help="load candle files (CSV, CSV.gz, zip, Parquet)")
    im.add_argument("files", nargs="+")
    im.add_argument("--symbol", help="default: from the file name (BTCUSDT-1m...)")
    im.add_argument("--interval", help="default: from the file name")
    im.add_argument("--update", action="store_true", help="overwrite candles already stored")
    im.add_argument("--chunk-rows", type=int, default=CHUNK_ROWS)
    im.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    im.set_defaults(fn=cmd_import)
