"""``gridstream backfill`` and ``gridstream import`` against real Postgres, real files and a
real local REST server serving real candles with Binance's paging."""

from __future__ import annotations

import csv
import gzip
import subprocess
import sys
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from aiohttp import web

from gridstream.cli import history

REPO = Path(__file__).resolve().parents[3]
BTC_1M = REPO / "data" / "klines" / "BTCUSDT-1m.csv.gz"


def real_rows(n: int) -> list[dict[str, str]]:
    out = []
    with gzip.open(BTC_1M, "rt") as fh:
        for row in csv.DictReader(fh):
            out.append(row)
            if len(out) == n:
                break
    return out


async def stored(database_url: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(database_url)
    try:
        return await conn.fetch("SELECT * FROM candles ORDER BY symbol, open_time")
    finally:
        await conn.close()


def same(row: asyncpg.Record, src: dict[str, str]) -> bool:
    return (
        row["open_time"] == int(src["open_time_ms"])
        and row["close_time"] == int(src["close_time_ms"])
        and all(row[k] == Decimal(src[k]) for k in ("open", "high", "low", "close", "volume"))
    )


# -- import -------------------------------------------------------------------------------


async def test_import_real_data_klines_file_in_chunks_then_again_is_a_no_op(
    database_url: str,
) -> None:
    res = await history.import_files(database_url, [BTC_1M], chunk_rows=10_000, progress=False)
    assert res[0].rows == res[0].written == 43199
    rows = await stored(database_url)
    assert len(rows) == 43199
    src = real_rows(3)
    assert all(same(r, s) for r, s in zip(rows, src, strict=False))
    assert {r["symbol"] for r in rows} == {"BTCUSDT"} and {r["interval"] for r in rows} == {"1m"}
    again = await history.import_files(database_url, [BTC_1M], progress=False)
    assert again[0].written == 0
    assert len(await stored(database_url)) == 43199


async def test_import_binance_headerless_csv_with_us_timestamps_and_parquet(
    database_url: str, tmp_path: Path
) -> None:
    src = real_rows(120)
    # data.binance.vision layout: no header, 12 columns, microseconds since 2025
    vision = tmp_path / "ETHUSDT-1m-2026-03-23.csv"
    with vision.open("w", newline="") as fh:
        w = csv.writer(fh)
        for r in src[:60]:
            w.writerow(
                [
                    int(r["open_time_ms"]) * 1000,
                    r["open"],
                    r["high"],
                    r["low"],
                    r["close"],
                    r["volume"],
                    int(r["close_time_ms"]) * 1000 + 999,
                    "123.5",
                    42,
                    "0",
                    "0",
                    "0",
                ]
            )
    parquet = tmp_path / "candles.parquet"
    table = pa.table(
        {
            "symbol": ["SOLUSDT"] * 60,
            "interval": ["1m"] * 60,
            "open_time_ms": [int(r["open_time_ms"]) for r in src[60:]],
            "open": [float(r["open"]) for r in src[60:]],
            "high": [float(r["high"]) for r in src[60:]],
            "low": [float(r["low"]) for r in src[60:]],
            "close": [float(r["close"]) for r in src[60:]],
            "volume": [float(r["volume"]) for r in src[60:]],
        }
    )
    pq.write_table(table, parquet)
    res = await history.import_files(database_url, [vision, parquet], progress=False)
    assert [r.written for r in res] == [60, 60]
    rows = await stored(database_url)
    eth = [r for r in rows if r["symbol"] == "ETHUSDT"]
    sol = [r for r in rows if r["symbol"] == "SOLUSDT"]
    assert all(same(r, s) for r, s in zip(eth, src[:60], strict=True))
    assert eth[0]["quote_volume"] == Decimal("123.5") and eth[0]["trades"] == 42
    assert all(same(r, s) for r, s in zip(sol, src[60:], strict=True))


def test_import_rejects_a_bad_row_naming_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "BTCUSDT-1m-bad.csv"
    bad.write_text("open_time_ms,open,high,low,close,volume\n1,1,2,0.5,1.5,3\n61,1,0.5,2,1,3\n")
    with pytest.raises(history.ImportError_, match=r"BTCUSDT-1m-bad.csv:3: inconsistent"):
        list(history.read_file(bad))


# -- backfill -----------------------------------------------------------------------------


class Rest:
    """/api/v3/klines with Binance's paging over real candles, /api/v3/time, and a switch
    to fail after N kline requests (an interrupted run)."""

    def __init__(self, rows: list[dict[str, str]], now_index: int) -> None:
        self.rows = rows
        self.now = int(rows[now_index]["open_time_ms"]) + 30_000  # mid-candle: it is forming
        self.queries: list[dict[str, str]] = []
        self.fail_after: int | None = None

    async def klines(self, request: web.Request) -> web.Response:
        q = dict(request.query)
        self.queries.append(q)
        if self.fail_after is not None and len(self.queries) > self.fail_after:
            return web.json_response({"code": -1000, "msg": "unknown"}, status=500)
        start, end = int(q["startTime"]), int(q.get("endTime", 2**62))
        limit = int(q.get("limit", "500"))
        out: list[list[Any]] = []
        for r in self.rows:
            t = int(r["open_time_ms"])
            if start <= t <= end and t <= self.now:  # real Binance serves the forming one
                out.append(
                    [
                        t,
                        r["open"],
                        r["high"],
                        r["low"],
                        r["close"],
                        r["volume"],
                        int(r["close_time_ms"]),
                        "0",
                        0,
                        "0",
                        "0",
                        "0",
                    ]
                )
            if len(out) == limit:
                break
        return web.json_response(out, headers={"X-MBX-USED-WEIGHT-1M": "2"})

    async def time(self, _: web.Request) -> web.Response:
        return web.json_response({"serverTime": self.now})


@pytest.fixture
async def rest() -> AsyncIterator[tuple[Rest, str]]:
    srv = Rest(real_rows(5000), now_index=4500)
    app = web.Application()
    app.router.add_get("/api/v3/klines", srv.klines)
    app.router.add_get("/api/v3/time", srv.time)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield srv, f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def test_backfill_resumes_where_it_stopped_and_ends_exact(
    rest: tuple[Rest, str], database_url: str
) -> None:
    srv, url = rest
    src = srv.rows
    t_from, t_to = int(src[100]["open_time_ms"]), int(src[4999]["open_time_ms"])
    srv.fail_after = 2  # two pages of 1000 per chunk -> the second chunk's 1st page fails
    with pytest.raises(Exception, match="HTTP 500"):
        await history.backfill(
            database_url, url, ["BTCUSDT"], "1m", t_from, t_to, chunk_rows=2000, progress=False
        )
    rows = await stored(database_url)
    assert [r["open_time"] for r in rows] == [int(r["open_time_ms"]) for r in src[100:2100]], [
        (q["startTime"], q.get("endTime")) for q in srv.queries
    ]
    srv.fail_after = None
    first_query = len(srv.queries)
    res = await history.backfill(
        database_url, url, ["BTCUSDT"], "1m", t_from, t_to, chunk_rows=2000, progress=False
    )
    # resumed right after the last stored candle
    assert srv.queries[first_query]["startTime"] == str(int(src[2100]["open_time_ms"]))
    assert res[0].resumed_from == int(src[2099]["open_time_ms"])
    rows = await stored(database_url)
    # every closed candle up to the venue's present (4500 is forming), each exactly once
    assert [r["open_time"] for r in rows] == [int(r["open_time_ms"]) for r in src[100:4500]]
    assert all(same(r, s) for r, s in zip(rows, src[100:4500], strict=True))
    assert all(q["limit"] == "1000" for q in srv.queries)
    # a third run has nothing left to do
    res = await history.backfill(database_url, url, ["BTCUSDT"], "1m", t_from, t_to, progress=False)
    assert res[0].written == 0


def test_cli_entry_points_are_registered() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "gridstream.cli", "backfill", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "--symbols" in out and "--from" in out and "--to" in out
    out = subprocess.run(
        [sys.executable, "-m", "gridstream.cli", "import", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "files" in out
