"""Replay parity: a day of real 1m candles of two symbols, replayed through the running
stack on the simulator, gives the very fills ``gridstream backtest`` gives, one for one in
time, price, quantity and fee.

The stack runs under ``gridstream run`` on real Redis and Postgres; the simulator replays
in lockstep (``GS_SIM_LOCKSTEP``) and :class:`gridstream.cli.lockstep.Lockstep` resumes it
at each barrier once the services have handled all it published. What the two runs share
is set the same on both sides: the window, the strategy's and risk's settings (defaults
on both), the venue's filters (the simulator's ``exchangeInfo``, saved for
``--exchange-info``), fees, cash, the price path (4 trades per candle: the path's
vertices), and no latency (each barrier gives the stack all the time it needs).
"""

from __future__ import annotations

import asyncio
import csv
import gzip
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from gridstream.cli.lockstep import Lockstep
from gridstream.cli.run import SERVICES
from gridstream.common.embedded import free_port, free_ports
from gridstream.core.fills import PATH_TRADES

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
SYMBOLS = ("BTCUSDT", "ETHUSDT")
#: The files' first candle (2026-03-23 12:09 UTC): nothing before it to backfill, so the
#: signals warm up on the replay itself, as the backtest's do.
WINDOW_START_MS = 1774267740000
HOURS = 24
CASH = "700"
FEE = "0.001"
UP_WITHIN_S = 180
BARRIER_TIMEOUT_S = 120

Row = tuple[int, str, str, Decimal, Decimal, Decimal, str]


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.load(resp)


def window_file(symbol: str, dest: Path) -> Path:
    """The replayed window of the repository's candle file, as its own CSV."""
    end = WINDOW_START_MS + HOURS * 3_600_000
    path = dest / f"{symbol}-1m.csv"
    with gzip.open(REPO / "data" / "klines" / f"{symbol}-1m.csv.gz", "rt") as src:
        reader = csv.reader(src)
        header = next(reader)
        col = header.index("open_time_ms")
        with path.open("w", newline="") as out:
            w = csv.writer(out, lineterminator="\n")
            w.writerow(header)
            n = 0
            for row in reader:
                if WINDOW_START_MS <= int(row[col]) < end:
                    w.writerow(row)
                    n += 1
    assert n == HOURS * 60, f"{symbol}: {n} candles in the window"
    return path


def row(time_ms: int, r: Mapping[str, Any]) -> Row:
    """One fill as the comparison sees it (Decimals without trailing zeros)."""
    return (
        time_ms,
        str(r["symbol"]),
        str(r["side"]),
        Decimal(r["price"]).normalize(),
        Decimal(r["qty"]).normalize(),
        Decimal(r["fee"]).normalize(),
        str(r["fee_asset"]),
    )


async def ledger_fills(database_url: str) -> list[Row]:
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT ts_event, symbol, side, price, qty, fee, fee_asset FROM fills"
        )
    finally:
        await conn.close()
    return sorted(row(r["ts_event"] // 1_000_000, r) for r in rows)


async def dump_verdicts(database_url: str, path: Path) -> None:
    """Risk's verdicts of the replay, kept beside the test's other files: what to read
    first when the two runs part."""
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT ts_event, symbol, client_order_id, action, side, price, qty, verdict,"
            " reason FROM risk_verdicts ORDER BY ts_event, client_order_id, action"
        )
    finally:
        await conn.close()
    with path.open("w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(
            ["ts_event", "symbol", "client_order_id", "action", "side", "price", "qty"]
            + ["verdict", "reason"]
        )
        w.writerows(tuple(r) for r in rows)


def backtest_fills(out: Path) -> list[Row]:
    with (out / "fills.csv").open() as fh:
        return sorted(row(int(r["time"]), r) for r in csv.DictReader(fh))


def test_the_stack_on_the_simulator_fills_as_the_backtest_does(redis_url, database_url, tmp_path):
    base = free_ports(len(SERVICES) + 1)
    sim_port = free_port()
    sim = f"http://127.0.0.1:{sim_port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GS_")}
    env.update(
        REDIS_URL=redis_url,
        DATABASE_URL=database_url,
        GS_SYMBOLS=",".join(SYMBOLS),
        GS_API_KEY="sim-key",
        GS_API_SECRET="sim-secret",
        GS_BLOCK_MS="100",
        GS_SIM_SYMBOLS=",".join(SYMBOLS),
        GS_SIM_START=str(WINDOW_START_MS),
        GS_SIM_HOURS=str(HOURS),
        GS_SIM_LOCKSTEP="true",
        GS_SIM_TRADES_PER_CANDLE=str(PATH_TRADES),
        GS_SIM_MAKER_FEE=FEE,
        GS_SIM_TAKER_FEE=FEE,
        GS_SIM_BALANCES=f"USDT={CASH}",
        GS_ARCHIVE_DIR=str(tmp_path / "archive"),
    )
    log = tmp_path / "run.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gridstream.cli", "run", "--exit-on-failure"]
            + ["--sim-port", str(sim_port), "--metrics-base-port", str(base)],
            env=env,
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
        )

    def tail() -> str:
        return "\n".join(log.read_text(errors="replace").splitlines()[-60:])

    def alive() -> None:
        if proc.poll() is not None:
            raise AssertionError(f"gridstream run exited ({proc.returncode})\n{tail()}")

    try:
        # the replay waits at its first barrier; every service must be connected first
        deadline = time.monotonic() + UP_WITHIN_S
        while True:
            alive()
            try:
                st = get_json(f"{sim}/sim/status")
            except OSError:
                st = {}
            if st.get("paused") and st.get("user_clients", 0) >= 1:
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"the stack did not come up: {st}\n{tail()}")
            time.sleep(0.2)
        info = get_json(f"{sim}/api/v3/exchangeInfo")
        (tmp_path / "exchange_info.json").write_text(json.dumps(info))

        driver = Lockstep(sim, redis_url, database_url, SYMBOLS)
        progress = asyncio.run(driver.run(barrier_timeout_s=BARRIER_TIMEOUT_S, check=alive))
        assert get_json(f"{sim}/sim/status")["done"] is True
        assert progress.barriers >= HOURS * 60, progress
        replayed = asyncio.run(ledger_fills(database_url))
        asyncio.run(dump_verdicts(database_url, tmp_path / "verdicts.csv"))
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

    files = [str(window_file(s, tmp_path)) for s in SYMBOLS]
    out_dir = tmp_path / "backtest"
    done = subprocess.run(
        [sys.executable, "-m", "gridstream.cli", "backtest", "--strategy", "grid"]
        + ["--candles", *files, "--out", str(out_dir), "--cash", CASH, "--fee", FEE]
        + ["--exchange-info", str(tmp_path / "exchange_info.json")],
        env={k: v for k, v in env.items() if k != "DATABASE_URL"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    tested = backtest_fills(out_dir)

    assert len(replayed) >= 20, f"too few fills to compare: {len(replayed)}"
    for sym in SYMBOLS:
        assert any(r[1] == sym for r in replayed), f"no fill of {sym}"
    only_replay = [r for r in replayed if r not in tested]
    only_backtest = [r for r in tested if r not in replayed]
    assert replayed == tested, (
        f"{len(replayed)} replayed fills, {len(tested)} backtested;"
        f" only in the replay: {only_replay[:5]}; only in the backtest: {only_backtest[:5]}"
    )
