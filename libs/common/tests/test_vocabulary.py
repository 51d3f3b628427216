"""The ledger's value sets are defined once, in Python, and the database holds exactly them."""

from __future__ import annotations

import re
from enum import StrEnum
from typing import get_args

import asyncpg
import pytest

from gridstream.common import db
from gridstream.common.ledger import LedgerStatus, OrderEventKind, RiskVerdict
from gridstream.common.messages import Actions, IntentAction

#: Every CHECK that must equal a vocabulary: (table, constraint) -> vocabulary name.
ENFORCED = {
    ("orders", "orders_status_check"): "LedgerStatus",
    ("order_events", "order_events_kind_check"): "OrderEventKind",
    ("risk_verdicts", "risk_verdicts_action_check"): "IntentAction",
    ("risk_verdicts", "risk_verdicts_verdict_check"): "RiskVerdict",
}
REPEATABLE = "R__vocabulary.sql"
_TEXT_LITERAL = re.compile(r"'((?:[^']|'')*)'::text")


def values(enum: type[StrEnum]) -> list[str]:
    return [m.value for m in enum]


async def check_values(conn: asyncpg.Connection, table: str, name: str) -> list[str]:
    """The values a CHECK ``col IN (...)`` constraint allows, in their order."""
    definition = await conn.fetchval(
        "SELECT pg_get_constraintdef(c.oid) FROM pg_constraint c"
        " WHERE c.conrelid = $1::regclass AND c.conname = $2",
        table,
        name,
    )
    assert definition is not None, f"{table} has no constraint {name}"
    return [v.replace("''", "'") for v in _TEXT_LITERAL.findall(definition)]


# ------------------------------------------------------------------------------ no database
def test_the_vocabulary_is_the_enums() -> None:
    assert db.SQL_VOCABULARY["LedgerStatus"] == {m.name: m.value for m in LedgerStatus}
    assert db.SQL_VOCABULARY["OrderEventKind"] == {m.name: m.value for m in OrderEventKind}
    assert db.SQL_VOCABULARY["RiskVerdict"] == {m.name: m.value for m in RiskVerdict}
    # the intent actions: the Literal type of the messages and its named constants agree
    assert tuple(db.SQL_VOCABULARY["IntentAction"].values()) == get_args(IntentAction)
    assert db.SQL_VOCABULARY["IntentAction"] == {"PLACE": Actions.PLACE, "CANCEL": Actions.CANCEL}
    assert set(db.SQL_VOCABULARY) == set(ENFORCED.values())  # each one is enforced


def test_open_statuses_are_statuses() -> None:
    assert set(LedgerStatus.OPEN) < set(LedgerStatus)
    assert LedgerStatus.OPEN == (
        LedgerStatus.PENDING,
        LedgerStatus.ACCEPTED,
        LedgerStatus.PARTIALLY_FILLED,
        LedgerStatus.UNKNOWN,
    )


def test_failed_kind_follows_the_action() -> None:
    assert OrderEventKind.failed(Actions.PLACE) is OrderEventKind.PLACE_FAILED
    assert OrderEventKind.failed(Actions.CANCEL) is OrderEventKind.CANCEL_FAILED


def test_render_fills_lists_and_single_values() -> None:
    vocab = {"Color": {"RED": "red", "ODD": "it's"}}
    sql = "CHECK (c IN ({{Color}})) WHERE c = {{ Color.RED }}"
    assert db.render(sql, vocab) == "CHECK (c IN ('red', 'it''s')) WHERE c = 'red'"
    assert db.render("SELECT '{' || '}'", vocab) == "SELECT '{' || '}'"


@pytest.mark.parametrize(
    ("sql", "error"),
    [
        ("{{Colour}}", "unknown vocabulary 'Colour'"),
        ("{{Color.BLUE}}", "no member 'BLUE'"),
        ("{{Color.RED.X}}", "malformed"),
        ("{{ }}", "malformed"),
    ],
)
def test_render_refuses_what_it_cannot_fill(sql: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        db.render(sql, {"Color": {"RED": "red"}})


def test_no_migration_keeps_a_copy_of_a_vocabulary_value() -> None:
    """Every quoted value of a vocabulary in the SQL comes from a placeholder."""
    from importlib import resources

    folder = resources.files("gridstream.common").joinpath("migrations")
    quoted = {db.sql_literal(v) for names in db.SQL_VOCABULARY.values() for v in names.values()}
    for f in folder.iterdir():
        if not f.name.endswith(".sql"):
            continue
        code = "\n".join(line.partition("--")[0] for line in f.read_text().splitlines())
        found = sorted(q for q in quoted if q in code)
        assert not found, f"{f.name} types {found} itself; use a {{{{...}}}} placeholder"


def test_repeatable_migrations_come_after_the_numbered_ones() -> None:
    numbered = [n for n, _ in db.migration_files()]
    assert numbered and all(re.match(r"^[0-9]{4}_", n) for n in numbered)
    assert [n for n, _ in db.repeatable_migrations()] == [REPEATABLE]


# ------------------------------------------------------------------------------ Postgres
async def test_the_database_checks_equal_the_enums(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        for (table, name), vocab in ENFORCED.items():
            expected = list(db.SQL_VOCABULARY[vocab].values())
            assert await check_values(conn, table, name) == expected, (table, name)
        # exactly one CHECK per column: 0004's inline ones were replaced, not doubled
        count = await conn.fetchval(
            "SELECT count(*) FROM pg_constraint WHERE contype = 'c'"
            " AND conrelid = 'risk_verdicts'::regclass"
        )
        assert count == 3  # side, action, verdict
    finally:
        await conn.close()


async def test_a_value_outside_the_enum_is_refused(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        insert = (
            "INSERT INTO order_events (event_id, client_order_id, kind, ts_event)"
            " VALUES ($1, 'c', $2, 1)"
        )
        await conn.execute(insert, "e1", OrderEventKind.FILL)
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute(insert, "e2", "filled")
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute(
                "INSERT INTO orders (client_order_id, intent_id, venue, symbol, side, price,"
                " qty, status, ts_created, ts_updated)"
                " VALUES ('c', 'i', 'v', 'BTCUSDT', 'BUY', 1, 1, 'open', 1, 1)"
            )
    finally:
        await conn.close()


async def test_an_enum_value_added_reaches_a_migrated_database(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No new migration is needed: the repeatable one re-renders and is applied again."""
    conn = await asyncpg.connect(database_url)
    try:
        assert await db.migrate(conn) == []  # nothing changed: nothing re-applied
        grown = dict(db.SQL_VOCABULARY)
        grown["OrderEventKind"] = {**grown["OrderEventKind"], "EXPIRED": "expired"}
        monkeypatch.setattr(db, "SQL_VOCABULARY", grown)
        assert await db.migrate(conn) == [REPEATABLE]
        assert await check_values(conn, "order_events", "order_events_kind_check") == [
            *values(OrderEventKind),
            "expired",
        ]
        assert await db.migrate(conn) == []
        await conn.execute(
            "INSERT INTO order_events (event_id, client_order_id, kind, ts_event)"
            " VALUES ('e1', 'c', 'expired', 1)"
        )
        # taking the value away again while a row holds it stops the migration loudly
        monkeypatch.undo()
        with pytest.raises(asyncpg.CheckViolationError):
            await db.migrate(conn)
        await conn.execute("DELETE FROM order_events")
        assert await db.migrate(conn) == [REPEATABLE]
        assert await check_values(conn, "order_events", "order_events_kind_check") == values(
            OrderEventKind
        )
    finally:
        await conn.close()


async def test_a_database_from_before_the_vocabulary_gets_it(database_url: str) -> None:
    """A database migrated by the previous release: no checksum column, no constraints."""
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(f"DELETE FROM {db.MIGRATIONS_TABLE} WHERE name = $1", REPEATABLE)
        await conn.execute(f"ALTER TABLE {db.MIGRATIONS_TABLE} DROP COLUMN checksum")
        await conn.execute("ALTER TABLE orders DROP CONSTRAINT orders_status_check")
        await conn.execute("ALTER TABLE order_events DROP CONSTRAINT order_events_kind_check")
        assert await db.migrate(conn) == [REPEATABLE]
        for (table, name), vocab in ENFORCED.items():
            expected = list(db.SQL_VOCABULARY[vocab].values())
            assert await check_values(conn, table, name) == expected, (table, name)
        assert await db.migrate(conn) == []
    finally:
        await conn.close()
