"""``gridstream status`` shows the ledger's portfolio, computed by the kernel's Portfolio."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from decimal import Decimal

import asyncpg

D = Decimal
SYMBOL = "BTCUSDT"

#: (trade id, side, price, qty, fee, fee asset): a buy whose fee the venue took in BTC,
#: then a sell with its fee in USDT.
FILLS = [
    ("1", "BUY", D("60000"), D("0.002"), D("0.000002"), "BTC"),
    ("2", "SELL", D("61000"), D("0.001"), D("0.061"), "USDT"),
]


async def seed(database_url: str, *, candle_close: Decimal | None) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.executemany(
            "INSERT INTO fills (venue, symbol, trade_id, client_order_id, venue_order_id, side,"
            " price, qty, fee, fee_asset, liquidity, ts_event)"
            " VALUES ('simulator', $1, $2, 'gs-x', 'v', $3, $4, $5, $6, $7, 'maker', $8)",
            [(SYMBOL, t, side, p, q, f, a, n) for n, (t, side, p, q, f, a) in enumerate(FILLS)],
        )
        if candle_close is not None:
            await conn.execute(
                "INSERT INTO candles (symbol, interval, open_time, close_time, open, high, low,"
                " close, volume) VALUES ($1, '1m', 0, 59999, $2, $2, $2, $2, 1)",
                SYMBOL,
                candle_close,
            )
    finally:
        await conn.close()


def status(redis_url: str, database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "REDIS_URL": redis_url, "DATABASE_URL": database_url}
    return subprocess.run(
        [sys.executable, "-m", "gridstream.cli", "status", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_status_shows_positions_pnl_fees_and_equity(redis_url, database_url):
    await seed(database_url, candle_close=D("62000"))
    out = status(redis_url, database_url, "--json", "--cash", "1000")
    assert out.returncode == 0, out.stderr
    section = json.loads(out.stdout)["portfolio"]
    assert "error" not in section
    [book] = section["books"]
    [pos] = book["positions"]
    # 0.002 bought, 0.000002 of it taken as the fee, 0.001 sold
    assert D(pos["qty"]) == D("0.000998")
    assert D(pos["avg_cost"]) == D("60000")
    assert D(pos["realised"]) == D("1")  # (61000 - 60000) x 0.001
    assert D(pos["unrealised"]) == D("1.996")  # (62000 - 60000) x 0.000998
    assert pos["fees_by_asset"] == {"BTC": "0.000002", "USDT": "0.061"}
    assert (D(pos["last_price"]), pos["marked_at"]) == (D("62000"), "candle")
    assert book["fees_paid"] == {"BTC": "0.000002", "USDT": "0.061"}
    # 1000 - 120 + 61 - 0.061 USDT, and 0.000998 BTC at 62000
    assert D(book["equity"]) == D("1002.815")
    assert D(book["balances"]["USDT"]) == D("940.939")
    # equity - cash = realised + unrealised - fees (0.12 + 0.061)
    assert D(book["equity"]) - 1000 == D(book["realised"]) + D(book["unrealised"]) - D(book["fees"])

    human = status(redis_url, database_url)
    assert human.returncode == 0, human.stderr
    assert "PORTFOLIO (ledger)" in human.stdout
    row = next(x.split() for x in human.stdout.splitlines() if x.startswith(SYMBOL))
    assert row[:5] == [SYMBOL, "0.000998", "60000", "1", "1.996"]
    assert "equity: unknown" in human.stdout  # no --cash: the account's cash is not known


async def test_status_marks_at_the_last_fill_without_candles(redis_url, database_url):
    await seed(database_url, candle_close=None)
    out = status(redis_url, database_url, "--json")
    assert out.returncode == 0, out.stderr
    [book] = json.loads(out.stdout)["portfolio"]["books"]
    [pos] = book["positions"]
    assert (D(pos["last_price"]), pos["marked_at"]) == (D("61000"), "fill")
    assert D(pos["unrealised"]) == D("0.998")
    assert book["equity"] is None and book["balances"] is None


def test_status_without_a_ledger_says_so(redis_url):
    env = {**os.environ, "REDIS_URL": redis_url}
    out = subprocess.run(
        [sys.executable, "-m", "gridstream.cli", "status", "--json", "--no-ledger"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["portfolio"]["books"] == []


def test_figures_made_by_division_show_to_eight_decimals():
    from gridstream.cli.status import _book_report
    from gridstream.core.portfolio import book_from_fills

    rows = [
        {
            "venue": "simulator",
            "symbol": SYMBOL,
            "trade_id": t,
            "side": "BUY",
            "price": p,
            "qty": q,
            "fee": D(0),
            "fee_asset": "USDT",
        }
        for t, p, q in (("1", D("1"), D("1")), ("2", D("2"), D("2")))
    ]
    book = book_from_fills(rows, quote="USDT")
    report = _book_report(book, {SYMBOL: D("3")}, with_cash=False)
    [pos] = report["positions"]
    # cost 5 over 3 held: 1.666..., shown as the ledger's 8 decimals
    assert pos["avg_cost"] == "1.66666667"
    assert pos["unrealised"] == "4"  # 3 x 3 - 5, exact
    assert pos["qty"] == "3"
