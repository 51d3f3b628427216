"""``gridstream status``: streams, consumer groups, dead letters, service health, and the
portfolio of the ledger.

The portfolio is the kernel's (:func:`gridstream.core.portfolio.book_from_fills` over the
ledger's ``fills``, one book per quote asset), each symbol marked at its last candle's
close in the ``candles`` table, else at its last fill's price. The account's cash is not
in the ledger: balances and equity are shown when ``--cash`` gives the quote balance the
account had before its first fill.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from decimal import ROUND_HALF_UP, Decimal
from typing import Any, Final

import asyncpg
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from gridstream.common.ledger import SELECT_FILLS
from gridstream.common.runtime import HEARTBEAT_TTL_S
from gridstream.common.streams import dead_letters, heartbeat_key, pattern_all, supervisor_key
from gridstream.core.portfolio import FillBook, FillRow, book_from_fills, split_symbol

from .common import s
from .supervise import crash_loop_text, decode_state, describe_exit

#: Prefix shared by every dead-letter stream (``gs:dlq:``).
DLQ_PREFIX = dead_letters("")


async def _groups(redis: aioredis.Redis, stream: str) -> list[dict[str, Any]]:
    try:
        infos = await redis.xinfo_groups(stream)
    except ResponseError:
        return []
    out = []
    for info in infos:
        name = s(info["name"])
        consumers = []
        try:
            for c in await redis.xinfo_consumers(stream, name):
                consumers.append(
                    {
                        "name": s(c["name"]),
                        "pending": int(c.get("pending") or 0),
                        "idle_ms": int(c.get("idle") or 0),
                    }
                )
        except ResponseError:
            pass
        lag = info.get("lag")
        out.append(
            {
                "name": name,
                "pending": int(info.get("pending") or 0),
                "lag": None if lag is None else int(lag),
                "last_delivered_id": s(info.get("last-delivered-id")),
                "consumers": consumers,
            }
        )
    return out


#: The last close of each symbol (``$1``: the symbols), whatever the interval.
_LAST_CLOSES: Final = (
    "SELECT DISTINCT ON (symbol) symbol, close FROM candles WHERE symbol = ANY($1::text[])"
    " ORDER BY symbol, close_time DESC"
)
#: How long ``status`` waits for the ledger's Postgres.
LEDGER_TIMEOUT_S: Final = 5.0
#: The quote asset ``--cash`` is in, unless the ledger has only one.
DEFAULT_CASH_ASSET: Final = "USDT"
#: Marks of a position: its last candle's close, or its last fill's price.
MARK_CANDLE: Final = "candle"
MARK_FILL: Final = "fill"


def _books(rows: list[FillRow], *, cash: Decimal | None, cash_asset: str) -> dict[str, FillBook]:
    """One kernel book per quote asset of the ledger's symbols (equity is in one asset);
    ``cash`` is the starting balance of ``cash_asset`` (or of the only quote asset)."""
    by_quote: dict[str, list[FillRow]] = defaultdict(list)
    for r in rows:
        by_quote[split_symbol(str(r["symbol"]))[1]].append(r)
    if len(by_quote) == 1:
        cash_asset = next(iter(by_quote))
    return {
        q: book_from_fills(qrows, quote=q, cash=cash if q == cash_asset else None)
        for q, qrows in sorted(by_quote.items())
    }


#: Decimals of a figure derived by division (average cost and the PnL made from it):
#: the ledger's own precision, not the 28 digits of the context.
DERIVED_PLACES = Decimal("1E-8")


def _num(value: Decimal) -> str:
    """A Decimal in plain notation, without trailing zeros (``6.0E+4`` -> ``60000``)."""
    return f"{value.normalize():f}"


def _derived(value: Decimal) -> str:
    """:func:`_num` of a figure derived by division, to 8 decimals (half up)."""
    return _num(value.quantize(DERIVED_PLACES, rounding=ROUND_HALF_UP))


def _book_report(book: FillBook, marks: dict[str, Decimal], with_cash: bool) -> dict[str, Any]:
    pf = book.portfolio
    positions = []
    for symbol, pos in sorted(pf.positions.items()):
        mark = marks.get(symbol)
        if mark is not None:
            book.mark(symbol, mark)
        positions.append(
            {
                "symbol": symbol,
                "base": pos.base,
                "qty": _num(pos.qty),
                "avg_cost": _derived(pos.avg_cost),
                "realised": _derived(pos.realised),
                "unrealised": _derived(pos.unrealised),
                "fees": _num(pos.fees),
                "fees_by_asset": {a: _num(f) for a, f in sorted(pos.fees_by_asset.items())},
                "last_price": None if pos.last_price is None else _num(pos.last_price),
                "marked_at": MARK_CANDLE if mark is not None else MARK_FILL,
            }
        )
    return {
        "quote": pf.quote,
        "positions": positions,
        "realised": _derived(pf.realised()),
        "unrealised": _derived(pf.unrealised()),
        "fees": _num(pf.fees()),
        "fees_paid": {a: _num(f) for a, f in sorted(pf.fees_paid.items())},
        "balances": {a: _num(b) for a, b in sorted(pf.balances.items())} if with_cash else None,
        "equity": _derived(pf.equity()) if with_cash else None,
    }


async def ledger_portfolio(
    conn: asyncpg.Connection, *, cash: Decimal | None = None, cash_asset: str = DEFAULT_CASH_ASSET
) -> list[dict[str, Any]]:
    """The ledger's portfolio, one entry per quote asset, as plain data."""
    rows = await conn.fetch(SELECT_FILLS, None)
    books = _books(list(rows), cash=cash, cash_asset=cash_asset)
    symbols = sorted({str(r["symbol"]) for r in rows})
    marks = {r["symbol"]: Decimal(r["close"]) for r in await conn.fetch(_LAST_CLOSES, symbols)}
    return [_book_report(b, marks, with_cash=b.cash_known) for b in books.values()]


async def _portfolio_section(
    database_url: str | None, cash: Decimal | None, cash_asset: str
) -> dict[str, Any]:
    if database_url is None:
        return {"books": [], "error": "no ledger asked for"}
    try:
        conn = await asyncpg.connect(database_url, timeout=LEDGER_TIMEOUT_S)
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        return {"books": [], "error": f"ledger not reachable: {exc}"}
    try:
        return {"books": await ledger_portfolio(conn, cash=cash, cash_asset=cash_asset)}
    except asyncpg.UndefinedTableError as exc:
        return {"books": [], "error": f"no ledger tables ({exc}); run gridstream migrate"}
    finally:
        await conn.close()


async def collect(
    redis: aioredis.Redis,
    *,
    now_ns: int | None = None,
    database_url: str | None = None,
    cash: Decimal | None = None,
    cash_asset: str = DEFAULT_CASH_ASSET,
) -> dict[str, Any]:
    """Everything ``status`` shows, as plain data (what ``--json`` prints)."""
    now_ns = time.time_ns() if now_ns is None else now_ns
    names = sorted(
        {s(k) async for k in redis.scan_iter(match=pattern_all(), count=500, _type="stream")}
    )
    streams: list[dict[str, Any]] = []
    dlqs: list[dict[str, Any]] = []
    for name in names:
        length = int(await redis.xlen(name))
        if name.startswith(DLQ_PREFIX):
            dlqs.append({"name": name, "group": name[len(DLQ_PREFIX) :], "length": length})
        else:
            streams.append({"name": name, "length": length, "groups": await _groups(redis, name)})
    services: list[dict[str, Any]] = []
    async for key in redis.scan_iter(match=heartbeat_key("*", "*"), count=500):
        raw = await redis.get(key)
        if raw is None:
            continue
        try:
            body = json.loads(raw)
        except ValueError:
            continue
        ts = int(body.get("ts") or 0)
        age_s = max(0.0, (now_ns - ts) / 1e9)
        services.append(
            {
                "service": body.get("service", ""),
                "replica": body.get("replica", ""),
                "ready": bool(body.get("ready")),
                "pid": body.get("pid"),
                "metrics_port": body.get("metrics_port"),
                "age_s": round(age_s, 1),
                "stale": age_s > HEARTBEAT_TTL_S,
                "role": body.get("role"),
                "symbols": body.get("symbols"),
                "fencing_token": body.get("fencing_token"),
                "lost_entries": int(body.get("lost_entries") or 0),
            }
        )
    services.sort(key=lambda x: (x["service"], x["replica"]))
    return {
        "streams": streams,
        "dead_letters": dlqs,
        "services": services,
        "supervisor": await _supervisor(redis, now_ns),
        "portfolio": await _portfolio_section(database_url, cash, cash_asset),
    }


async def _supervisor(redis: aioredis.Redis, now_ns: int) -> list[dict[str, Any]]:
    """What ``gridstream run`` says of its children (empty when no ``run`` supervises)."""
    raw: Any = await redis.hgetall(supervisor_key())
    out: list[dict[str, Any]] = []
    for value in raw.values():
        try:
            st = decode_state(value)
        except ValueError:
            continue
        age_s = max(0.0, (now_ns - st.ts) / 1e9)
        out.append(
            {
                "service": st.service,
                "phase": st.phase.value,
                "pid": st.pid,
                "restarts": st.restarts,
                "last_exit": None if st.last_exit_code is None else st.last_exit_code,
                "last_exit_text": ""
                if st.last_exit_code is None
                else describe_exit(st.last_exit_code),
                "crash_loop": st.crash_loop,
                "crash_loop_text": crash_loop_text(st, now_ns),
                "backoff_s": st.backoff_s if st.phase == "backoff" else None,
                "reason": st.reason,
                "supervisor_pid": st.supervisor_pid,
                "stale": age_s > HEARTBEAT_TTL_S,
            }
        )
    out.sort(key=lambda x: x["service"])
    return out


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    return "\n".join(lines)


def render(report: dict[str, Any]) -> str:
    """The human view: three tables."""
    parts: list[str] = []
    rows: list[list[str]] = []
    for st in report["streams"]:
        if not st["groups"]:
            rows.append([st["name"], str(st["length"]), "-", "", "", ""])
        for g in st["groups"]:
            consumers = ",".join(c["name"] for c in g["consumers"]) or "-"
            lag = "?" if g["lag"] is None else str(g["lag"])
            rows.append(
                [st["name"], str(st["length"]), g["name"], lag, str(g["pending"]), consumers]
            )
    parts.append("STREAMS")
    parts.append(
        _table(["stream", "length", "group", "lag", "pending", "consumers"], rows)
        if rows
        else "  (no gridstream streams)"
    )
    parts.append("")
    parts.append("DEAD LETTERS")
    dl_rows = [[d["name"], d["group"], str(d["length"])] for d in report["dead_letters"]]
    parts.append(_table(["stream", "group", "length"], dl_rows) if dl_rows else "  (none)")
    parts.append("")
    parts.append("SERVICES")
    sv_rows = []
    for sv in report["services"]:
        health = "STALE" if sv["stale"] else ("ready" if sv["ready"] else "starting")
        role = sv.get("role") or "-"
        if sv.get("fencing_token") is not None and role == "active":
            role = f"active #{sv['fencing_token']}"
        symbols = ",".join(sv.get("symbols") or []) or "-"
        sv_rows.append(
            [
                sv["service"],
                str(sv["replica"]),
                health,
                role,
                symbols,
                str(sv["pid"]),
                str(sv["metrics_port"]),
                f"{sv['age_s']}s",
                str(sv.get("lost_entries") or 0),
            ]
        )
    headers = ["service", "replica", "health", "role", "symbols", "pid", "metrics", "heartbeat"]
    parts.append(_table([*headers, "lost"], sv_rows) if sv_rows else "  (no heartbeats)")
    if report.get("supervisor"):
        parts.append("")
        parts.append("SUPERVISOR (gridstream run)")
        sup_rows = []
        for c in report["supervisor"]:
            note = c["crash_loop_text"] or c["reason"]
            if c["phase"] == "backoff" and c["backoff_s"] is not None:
                note = f"restart in {c['backoff_s']}s; {note}"
            phase = "STALE" if c["stale"] else c["phase"]
            if c["crash_loop"]:
                phase = f"{phase} CRASH-LOOP"
            sup_rows.append(
                [
                    c["service"],
                    phase,
                    "-" if c["pid"] is None else str(c["pid"]),
                    str(c["restarts"]),
                    c["last_exit_text"] or "-",
                    note,
                ]
            )
        parts.append(_table(["service", "state", "pid", "restarts", "last exit", "note"], sup_rows))
    parts += _render_portfolio(report.get("portfolio") or {})
    return "\n".join(parts)


def _fees_text(fees: dict[str, str]) -> str:
    return ",".join(f"{f} {a}" for a, f in fees.items()) or "-"


def _render_portfolio(section: dict[str, Any]) -> list[str]:
    parts = ["", "PORTFOLIO (ledger)"]
    if section.get("error"):
        parts.append(f"  ({section['error']})")
        return parts
    if not section.get("books"):
        parts.append("  (no fills)")
        return parts
    headers = ["symbol", "qty", "avg cost", "realised", "unrealised", "fees", "mark"]
    for book in section["books"]:
        rows = [
            [
                p["symbol"],
                p["qty"],
                p["avg_cost"],
                p["realised"],
                p["unrealised"],
                _fees_text(p["fees_by_asset"]),
                f"{p['last_price'] or '-'} ({p['marked_at']})",
            ]
            for p in book["positions"]
        ]
        parts.append(_table(headers, rows))
        q = book["quote"]
        parts.append(
            f"  {q}: realised {book['realised']}, unrealised {book['unrealised']},"
            f" fees {book['fees']} (paid: {_fees_text(book['fees_paid'])})"
        )
        if book["equity"] is not None:
            balances = ", ".join(f"{b} {a}" for a, b in book["balances"].items())
            parts.append(f"  equity {book['equity']} {q} (balances: {balances})")
        else:
            parts.append("  equity: unknown (give the account's starting cash with --cash)")
    return parts


async def status(
    redis: aioredis.Redis,
    *,
    as_json: bool,
    database_url: str | None = None,
    cash: Decimal | None = None,
    cash_asset: str = DEFAULT_CASH_ASSET,
) -> str:
    report = await collect(redis, database_url=database_url, cash=cash, cash_asset=cash_asset)
    return json.dumps(report, indent=2) if as_json else render(report)
