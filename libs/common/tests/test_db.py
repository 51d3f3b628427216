from __future__ import annotations

from decimal import Decimal

import asyncpg

from gridstream.common import db


def rows(n: int, start: int = 0):
    return [
        (
            "BTCUSDT",
            "1m",
            60_000 * i,
            60_000 * i + 59_999,
            Decimal("1.10"),
            Decimal("2.2"),
            Decimal("0.5"),
            Decimal(f"1.{i}"),
            Decimal("10.00000001"),
            Decimal(0),
            0,
            "rest",
        )
        for i in range(start, start + n)
    ]


COLS = (
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
KEY = ("symbol", "interval", "open_time")


async def test_migrations_apply_once_in_order(database_url):
    conn = await asyncpg.connect(database_url)
    try:
        assert await db.migrate(conn) == []  # the fixture applied them already
        names = [
            r["name"]
            for r in await conn.fetch(
                "SELECT name FROM schema_migrations ORDER BY applied_at, name"
            )
        ]
        numbered = [n for n, _ in db.migration_files()]
        assert numbered == sorted(numbered)
        # numbered ones in order, then the repeatable ones
        assert names == numbered + [n for n, _ in db.repeatable_migrations()]
        tables = {
            r["tablename"]
            for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        }
        assert {"candles", "orders", "order_events", "fills"} <= tables
    finally:
        await conn.close()


async def test_copy_upsert_drops_duplicates_and_keeps_decimals_exact(database_url):
    conn = await asyncpg.connect(database_url)
    try:
        async with conn.transaction():
            assert await db.copy_upsert(conn, "candles", COLS, rows(100), key=KEY) == 100
        async with conn.transaction():
            # overlap of 50 + 50 new, with a duplicate inside the batch itself
            batch = rows(100, start=50) + rows(1, start=120)
            assert await db.copy_upsert(conn, "candles", COLS, batch, key=KEY) == 50
        assert await conn.fetchval("SELECT count(*) FROM candles") == 150
        assert await conn.fetchval("SELECT volume FROM candles WHERE open_time = 0") == Decimal(
            "10.00000001"
        )
    finally:
        await conn.close()


async def test_copy_upsert_can_update_listed_columns(database_url):
    conn = await asyncpg.connect(database_url)
    try:
        async with conn.transaction():
            await db.copy_upsert(conn, "candles", COLS, rows(3), key=KEY)
        changed = [r[:7] + (Decimal("9.9"),) + r[8:] for r in rows(3)]
        async with conn.transaction():
            n = await db.copy_upsert(conn, "candles", COLS, changed, key=KEY, update=("close",))
        assert n == 3
        closes = {r["close"] for r in await conn.fetch("SELECT close FROM candles")}
        assert closes == {Decimal("9.9")}
    finally:
        await conn.close()
