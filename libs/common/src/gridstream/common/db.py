"""Postgres: pool, ordered plain-SQL migrations, and COPY-based bulk upserts."""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from enum import StrEnum
from importlib import resources
from typing import Any, Final

import asyncpg

from gridstream.common.ledger import LedgerStatus, OrderEventKind, RiskVerdict
from gridstream.common.messages import Actions, Candle

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
    """Open an asyncpg pool (its sessions carry a fencing token once :func:`take_fence`)."""
    fence: dict[str, tuple[str, str]] = {}

    async def init(conn: asyncpg.Connection) -> None:
        if "fence" in fence:
            service, token = fence["fence"]
            await conn.execute(
                "SELECT set_config($1, $2, false), set_config($3, $4, false)",
                FENCE_SERVICE_SETTING,
                service,
                FENCE_TOKEN_SETTING,
                token,
            )

    pool = await asyncpg.create_pool(dsn, min_size=min_size, max_size=max_size, init=init)
    if pool is None:  # pragma: no cover - asyncpg returns a pool or raises
        raise RuntimeError("could not create a Postgres pool")
    _POOL_FENCES[id(pool)] = fence
    return pool


def _names(vocabulary: type) -> dict[str, str]:
    """Member name -> value of a StrEnum, or of a class of ``Final`` str constants."""
    if issubclass(vocabulary, StrEnum):
        return {m.name: m.value for m in vocabulary}
    return {k: v for k, v in vars(vocabulary).items() if k.isupper() and isinstance(v, str)}


#: The value sets migrations render from Python (``{{Name}}``, ``{{Name.MEMBER}}``): the
#: ledger enums and the intent actions, member name -> value, in definition order.
SQL_VOCABULARY: Final[Mapping[str, Mapping[str, str]]] = {
    "LedgerStatus": _names(LedgerStatus),
    "OrderEventKind": _names(OrderEventKind),
    "RiskVerdict": _names(RiskVerdict),
    "IntentAction": _names(Actions),
}

_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)(?:\.([A-Za-z_][A-Za-z0-9_]*))?\s*\}\}")
#: Migration files: numbered ones, applied once each in order; repeatable ones
#: (``R__name.sql``), applied after them and again whenever their rendered text changes.
_VERSIONED = re.compile(r"^[0-9]{4}_[a-z0-9_]+\.sql$")
_REPEATABLE = re.compile(r"^R__[a-z0-9_]+\.sql$")


def sql_literal(value: str) -> str:
    """``value`` as a quoted SQL string literal."""
    return "'" + value.replace("'", "''") + "'"


def render(sql: str, vocabulary: Mapping[str, Mapping[str, str]] | None = None) -> str:
    """A migration's text with its vocabulary placeholders filled in.

    ``{{OrderEventKind}}`` becomes every value, quoted and comma-separated, for
    ``CHECK (kind IN ({{OrderEventKind}}))``; ``{{RiskVerdict.APPROVED}}`` becomes the one
    value ``'approved'``. An unknown name or member is an error, never left in the SQL.
    """
    vocab = SQL_VOCABULARY if vocabulary is None else vocabulary

    def fill(m: re.Match[str]) -> str:
        name, member = m[1], m[2]
        if name not in vocab:
            raise ValueError(f"unknown vocabulary {name!r} in {m[0]}; known: {sorted(vocab)}")
        values = vocab[name]
        if member is None:
            return ", ".join(sql_literal(v) for v in values.values())
        if member not in values:
            raise ValueError(f"{name} has no member {member!r} ({m[0]}); has {list(values)}")
        return sql_literal(values[member])

    out = _PLACEHOLDER.sub(fill, sql)
    if "{{" in out or "}}" in out:
        raise ValueError("a malformed {{...}} placeholder is left in a migration")
    return out


def _migration_texts(pattern: re.Pattern[str]) -> list[tuple[str, str]]:
    folder = resources.files("gridstream.common").joinpath("migrations")
    names = sorted(p.name for p in folder.iterdir() if pattern.match(p.name))
    return [(n, render(folder.joinpath(n).read_text())) for n in names]


def migration_files() -> list[tuple[str, str]]:
    """(name, rendered sql) of every numbered migration shipped with gridstream, in order."""
    return _migration_texts(_VERSIONED)


def repeatable_migrations() -> list[tuple[str, str]]:
    """(name, rendered sql) of every repeatable migration, by name."""
    return _migration_texts(_REPEATABLE)


def checksum(sql: str) -> str:
    """The checksum recorded for a migration's rendered text."""
    return hashlib.sha256(sql.encode()).hexdigest()


async def migrate(conn: asyncpg.Connection | asyncpg.Pool) -> list[str]:
    """Apply pending migrations, each in its own transaction; returns those applied.

    Numbered migrations run once each, in order. Then each repeatable migration runs if
    its rendered text (its checksum) differs from the one last applied: a value added to
    a vocabulary enum re-renders ``R__vocabulary.sql``, so every database, however old,
    ends with the constraints the code defines. A transaction-level advisory lock makes
    concurrent starts of several services safe.
    """
    applied: list[str] = []
    async with _acquire(conn) as c:
        await c.execute(
            f"CREATE TABLE IF NOT EXISTS {MIGRATIONS_TABLE} ("
            " name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now(),"
            " checksum text)"
        )
        async with c.transaction():
            await c.execute("SELECT pg_advisory_xact_lock(727274)")
            # tables made before repeatable migrations existed lack the column
            await c.execute(
                f"ALTER TABLE {MIGRATIONS_TABLE} ADD COLUMN IF NOT EXISTS checksum text"
            )
        for name, sql in migration_files():
            async with c.transaction():
                await c.execute("SELECT pg_advisory_xact_lock(727274)")
                done = await c.fetchval(f"SELECT 1 FROM {MIGRATIONS_TABLE} WHERE name = $1", name)
                if done:
                    continue
                await c.execute(sql)
                await c.execute(
                    f"INSERT INTO {MIGRATIONS_TABLE} (name, checksum) VALUES ($1, $2)",
                    name,
                    checksum(sql),
                )
                applied.append(name)
                log.info("applied migration %s", name)
        for name, sql in repeatable_migrations():
            async with c.transaction():
                await c.execute("SELECT pg_advisory_xact_lock(727274)")
                done = await c.fetchval(
                    f"SELECT checksum FROM {MIGRATIONS_TABLE} WHERE name = $1", name
                )
                if done == checksum(sql):
                    continue
                await c.execute(sql)
                await c.execute(
                    f"INSERT INTO {MIGRATIONS_TABLE} (name, checksum) VALUES ($1, $2)"
                    " ON CONFLICT (name) DO UPDATE SET checksum = EXCLUDED.checksum,"
                    " applied_at = now()",
                    name,
                    checksum(sql),
                )
                applied.append(name)
                log.info("applied repeatable migration %s", name)
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


#: SQLSTATE of a write refused because the session's fencing token is older than the
#: service's current one (migrations/0005_fencing.sql).
FENCED_SQLSTATE: Final = "GSF01"
#: Session settings that carry a fenced writer's service and token.
FENCE_SERVICE_SETTING: Final = "gridstream.fence_service"
FENCE_TOKEN_SETTING: Final = "gridstream.fence_token"


def is_fenced_out(exc: BaseException) -> bool:
    """True for a Postgres error raised because a newer active replica took over."""
    return getattr(exc, "sqlstate", None) == FENCED_SQLSTATE


async def take_fence(pool: asyncpg.Pool, service: str, token: int) -> None:
    """Record ``token`` as the service's current fencing token and fence every session.

    The token only ever rises (an older holder's late call changes nothing). The pool's
    connections are replaced, and each new one sets the token on its session, so every
    later write of this replica is checked against the current token in its own
    transaction.
    """
    async with pool.acquire() as conn:
        await conn.execute(
            "INSERT INTO service_fences (service, token) VALUES ($1, $2)"
            " ON CONFLICT (service) DO UPDATE SET"
            " token = GREATEST(service_fences.token, EXCLUDED.token), ts_updated = now()",
            service,
            token,
        )
    holder = _POOL_FENCES.get(id(pool))
    if holder is None:
        raise ValueError("take_fence needs a pool made by gridstream.common.db.create_pool")
    holder["fence"] = (service, str(token))
    await pool.expire_connections()


#: Per pool (by identity): the fence its sessions set when they connect.
_POOL_FENCES: dict[int, dict[str, tuple[str, str]]] = {}
