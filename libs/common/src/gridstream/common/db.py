"""Postgres: pool, ordered plain-SQL migrations, and COPY-based bulk upserts."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from importlib import resources
from typing import Any, Final

import asyncpg

from gridstream.common.messages import Candle

log = logging.getLogger("gridstream.db")

MIGRATIONS_TABLE: Final = "schema_migrations"

#: The ``candles`` table (migrations/0001_init.sql), named once for every writer.
CANDLES_TABLE: Final = "candles"
CANDLE_COLUMNS: Final = (
    "symbol",
    "interval",
    "open_time",
    "close_time",
    "open",
    "high",
    "low",
    "close",
    "volume",
    "quote_volume",
    "trades",
    "source",
)
CANDLE_KEY: Final = ("symbol", "interval", "open_time")
#: What an import may overwrite on a candle already stored (not the key, not the source).
CANDLE_UPDATE: Final = tuple(c for c in CANDLE_COLUMNS if c not in CANDLE_KEY and c != "source")


def candle_record(c: Candle) -> tuple[object, ...]:
    """A :class:`Candle` as a ``candles`` row, in :data:`CANDLE_COLUMNS` order."""
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
        c.source,
    )


_IDENT = re.compile(r"^[a-z_][a-z0-9_]*$")


def _ident(name: str) -> str:
    if not _IDENT.match(name):
        raise ValueError(f"unsafe SQL identifier: {name!r}")
    return name


async def create_pool(dsn: str, *, min_size: int = 1, max_size: int = 4) -> asyncpg.Pool:
    """Open an asyncpg pool."""
    pool = await asyncpg.create_pool(dsn, min_size=min_size, max_size=max_size)
    if pool is None:  # pragma: no cover - asyncpg returns a pool or raises
        raise RuntimeError("could not create a Postgres pool")
    return pool


def migration_files() -> list[tuple[str, str]]:
    """(name, sql) of every migration shipped with gridstream, in order."""
    folder = resources.files("gridstream.common").joinpath("migrations")
    names = sorted(p.name for p in folder.iterdir() if p.name.endswith(".sql"))
    return [(n, folder.joinpath(n).read_text()) for n in names]


async def migrate(conn: asyncpg.Connection | asyncpg.Pool) -> list[str]:
    """Apply pending migrations in order, each in its own transaction; returns those applied.

    A transaction-level advisory lock makes concurrent starts of several services safe.
    """
    applied: list[str] = []
    async with _acquire(conn) as c:
        await c.execute(
            f"CREATE TABLE IF NOT EXISTS {MIGRATIONS_TABLE} ("
            " name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        for name, sql in migration_files():
            async with c.transaction():
                await c.execute("SELECT pg_advisory_xact_lock(727274)")
                done = await c.fetchval(f"SELECT 1 FROM {MIGRATIONS_TABLE} WHERE name = $1", name)
                if done:
                    continue
                await c.execute(sql)
                await c.execute(f"INSERT INTO {MIGRATIONS_TABLE} (name) VALUES ($1)", name)
                applied.append(name)
                log.info("applied migration %s", name)
    return applied


class _acquire:
    def __init__(self, conn: asyncpg.Connection | asyncpg.Pool) -> None:
        self.conn = conn
        self._ctx: Any = None

    async def __aenter__(self) -> asyncpg.Connection:
        if isinstance(self.conn, asyncpg.Pool):
            self._ctx = self.conn.acquire()
            return await self._ctx.__aenter__()
        return self.conn

    async def __aexit__(self, *exc: object) -> None:
        if self._ctx is not None:
            await self._ctx.__aexit__(*exc)


async def copy_upsert(
    conn: asyncpg.Connection,
    table: str,
    columns: Sequence[str],
    records: Iterable[Sequence[Any]],
    *,
    key: Sequence[str],
    update: Sequence[str] = (),
) -> int:
    """Bulk upsert: COPY into a temporary staging table, then one INSERT ... ON CONFLICT.

    With ``update`` empty the conflict is ``DO NOTHING`` (duplicates are dropped);
    otherwise the listed columns take the new values. Returns rows inserted or updated.
    Must run inside a transaction (the staging table is dropped on commit).
    """
    table = _ident(table)
    cols = [_ident(c) for c in columns]
    keys = [_ident(c) for c in key]
    staging = f"_stage_{table}"
    await conn.execute(
        f"CREATE TEMP TABLE IF NOT EXISTS {staging} (LIKE {table} INCLUDING DEFAULTS)"
        " ON COMMIT DELETE ROWS"
    )
    await conn.copy_records_to_table(staging, records=records, columns=cols)
    col_list = ", ".join(cols)
    if update:
        sets = ", ".join(f"{_ident(c)} = EXCLUDED.{c}" for c in update)
        conflict = f"DO UPDATE SET {sets}"
    else:
        conflict = "DO NOTHING"
    result = await conn.execute(
        f"INSERT INTO {table} ({col_list}) SELECT DISTINCT ON ({', '.join(keys)}) {col_list}"
        f" FROM {staging} ORDER BY {', '.join(keys)}"
        f" ON CONFLICT ({', '.join(keys)}) {conflict}"
    )
    await conn.execute(f"TRUNCATE {staging}")
    return int(result.split()[-1])
