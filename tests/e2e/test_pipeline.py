"""The whole stack, end to end, as real processes on real Redis and Postgres.

The simulator replays 6 hours of real BTCUSDT and ETHUSDT 1m candles; the six
services run as separate processes exactly as `make run` starts them. Then:

* every candle of the window is in `candles` exactly once and equals the source file;
* signals were produced; orders were placed and some filled;
* the ledger's fills match the simulator's own record one for one;
* the simulator's balances equal the starting balances plus the ledger's fills net of fees;
* every service's /metrics answers with the standard names.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import gzip
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections import defaultdict
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis

from gridstream.common import metrics
from gridstream.common import streams as S
from gridstream.common.bus import group_behind
from gridstream.common.embedded import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]
SYMBOLS = ("BTCUSDT", "ETHUSDT")
WINDOW_START_MS = 1774310400000  # 2026-03-24 00:00 UTC: ~12 h of history before it for warm-up
HOURS = 6
SPEED = 600  # 6 h of market time in 36 s of wall time: as fast as the order loop can follow
START_BALANCES = {"USDT": Decimal("700")}
SERVICES = ("ingestor", "signals", "strategy", "risk", "executor", "archiver")
DEADLINE_S = 240


def source_candles(symbol: str) -> dict[int, tuple[Decimal, ...]]:
    end = WINDOW_START_MS + HOURS * 3_600_000
    out: dict[int, tuple[Decimal, ...]] = {}
    with gzip.open(REPO / "data" / "klines" / f"{symbol}-1m.csv.gz", "rt") as fh:
        for row in csv.DictReader(fh):
            t = int(row["open_time_ms"])
            if WINDOW_START_MS <= t < end:
                out[t] = tuple(Decimal(row[k]) for k in ("open", "high", "low", "close", "volume"))
    return out


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.load(resp)


def get_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.read().decode()


class Stack:
    """Starts the simulator and every service as child processes; logs go to files."""

    def __init__(self, redis_url: str, database_url: str, log_dir: Path) -> None:
        self.sim_port = free_port()
        self.metrics_ports = {svc: free_port() for svc in SERVICES}
        self.log_dir = log_dir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        base = {k: v for k, v in os.environ.items() if not k.startswith("GS_")}
        base.update(
            REDIS_URL=redis_url,
            DATABASE_URL=database_url,
            GS_SYMBOLS=",".join(SYMBOLS),
            GS_VENUE_REST_URL=f"http://127.0.0.1:{self.sim_port}",
            GS_VENUE_WS_URL=f"ws://127.0.0.1:{self.sim_port}",
            GS_API_KEY="sim-key",
            GS_API_SECRET="sim-secret",
            GS_LOG_FORMAT="json",
            GS_CLAIM_INTERVAL_S="5",
            GS_BLOCK_MS="100",
            GS_SIM_PORT=str(self.sim_port),
            GS_SIM_SYMBOLS=",".join(SYMBOLS),
            GS_SIM_START=str(WINDOW_START_MS),
            GS_SIM_HOURS=str(HOURS),
            GS_SIM_SPEED=str(SPEED),
            GS_SIM_BALANCES=",".join(f"{k}={v}" for k, v in START_BALANCES.items()),
            GS_ARCHIVE_DIR=str(log_dir / "archive"),
            PYTHONUNBUFFERED="1",
        )
        self.env = base

    def start(self, name: str) -> None:
        env = dict(self.env)
        if name in self.metrics_ports:
            env["GS_METRICS_PORT"] = str(self.metrics_ports[name])
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", f"gridstream.{name}"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise AssertionError(f"{name} exited with {proc.returncode}:\n{self.tail(name)}")

    def tail(self, name: str, n: int = 40) -> str:
        path = self.log_dir / f"{name}.log"
        return (
            "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else ""
        )

    def stop(self) -> dict[str, int | None]:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes: dict[str, int | None] = {}
        for name, proc in self.procs.items():
            try:
                codes[name] = proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                codes[name] = proc.wait(5)
        return codes


def wait_for(predicate, timeout: float, stack: Stack, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stack.check_alive()
        if predicate():
            return
        time.sleep(0.5)
    logs = "\n".join(f"--- {n}\n{stack.tail(n, 15)}" for n in stack.procs)
    raise AssertionError(f"timed out waiting for {what}\n{logs}")


def quiescent(r: redis.Redis) -> bool:
    """No group on any gridstream stream has undelivered or unacknowledged entries."""
    for key in r.scan_iter(match=S.pattern_all(), _type="stream"):
        newest = r.xinfo_stream(key)["last-generated-id"]
        if any(group_behind(newest, info) for info in r.xinfo_groups(key)):
            return False
    return True


async def ledger(database_url: str) -> dict[str, Any]:
    conn = await asyncpg.connect(database_url)
    try:
        return {
            "candles": await conn.fetch(
                "SELECT symbol, open_time, open, high, low, close, volume FROM candles"
                " WHERE interval = '1m' AND open_time >= $1 AND open_time < $2",
                WINDOW_START_MS,
                WINDOW_START_MS + HOURS * 3_600_000,
            ),
            "orders": await conn.fetchval("SELECT count(*) FROM orders"),
            "fills": await conn.fetch("SELECT * FROM fills"),
        }
    finally:
        await conn.close()


def test_whole_pipeline_on_replayed_real_data(redis_url, database_url, tmp_path):
    stack = Stack(redis_url, database_url, tmp_path)
    r = redis.Redis.from_url(redis_url)  # raw: XINFO STREAM carries encoded entries
    sim = f"http://127.0.0.1:{stack.sim_port}"
    try:
        stack.start("simulator")
        wait_for(lambda: _answers(f"{sim}/api/v3/ping"), 30, stack, "the simulator")
        for svc in SERVICES:
            stack.start(svc)
        wait_for(
            lambda: get_json(f"{sim}/sim/status").get("done") is True,
            DEADLINE_S,
            stack,
            "the replay to finish",
        )
        sim_fills = get_json(f"{sim}/sim/fills")
        sim_fills = sim_fills["fills"] if isinstance(sim_fills, dict) else sim_fills

        def settled() -> bool:
            if not quiescent(r):
                return False
            book = asyncio.run(ledger(database_url))
            return len(book["fills"]) >= len(sim_fills) and len(book["candles"]) >= HOURS * 60 * 2

        wait_for(settled, 120, stack, "the pipeline to drain")

        # every /metrics endpoint answers with the standard names
        for svc, port in stack.metrics_ports.items():
            text = get_text(f"http://127.0.0.1:{port}/metrics")
            missing = [n for n in metrics.STANDARD_NAMES if n not in text]
            assert not missing, f"{svc} /metrics lacks {missing}"
            assert get_json(f"http://127.0.0.1:{port}/healthz")["status"] == "ok"
        sim_balances = get_json(f"{sim}/sim/balances")
        signals = sum(r.xlen(S.stream(S.Kind.SIGNALS, s)) for s in SYMBOLS)
        book = asyncio.run(ledger(database_url))
    finally:
        codes = stack.stop()
        r.close()

    rejections: dict[str, int] = {}
    for line in (tmp_path / "risk.log").read_text().splitlines():
        msg = json.loads(line).get("msg", "") if line.startswith("{") else ""
        if msg.startswith("rejected "):
            reason = msg.split(": ", 1)[-1].split()[0]
            rejections[reason] = rejections.get(reason, 0) + 1
    print(
        f"\ne2e: {len(book['candles'])} window candles, {signals} signals,"
        f" {book['orders']} orders, {len(sim_fills)} fills, rejections {rejections}"
    )

    # clean shutdown on SIGTERM
    assert all(code == 0 for code in codes.values()), codes

    # every candle of the window exactly once, equal to the source
    for symbol in SYMBOLS:
        src = source_candles(symbol)
        assert len(src) == HOURS * 60
        rows = [row for row in book["candles"] if row["symbol"] == symbol]
        assert len(rows) == len(src), f"{symbol}: {len(rows)} rows for {len(src)} candles"
        for row in rows:
            want = src[row["open_time"]]
            got = (row["open"], row["high"], row["low"], row["close"], row["volume"])
            assert got == want, (symbol, row["open_time"], got, want)

    assert signals > 0
    assert book["orders"] > 0
    assert len(sim_fills) > 0, "no order was filled during the replay"

    # the ledger's fills are the simulator's fills, one for one
    def key(symbol: str, trade_id: Any) -> tuple[str, str]:
        return symbol, str(trade_id)

    ledger_fills = {key(f["symbol"], f["trade_id"]): f for f in book["fills"]}
    assert len(ledger_fills) == len(book["fills"])
    sim_by_key = {key(f["symbol"], f["tradeId"]): f for f in sim_fills}
    assert set(ledger_fills) == set(sim_by_key)
    for k, sf in sim_by_key.items():
        lf = ledger_fills[k]
        assert lf["client_order_id"] == sf["clientOrderId"]
        assert lf["price"] == Decimal(sf["price"])
        assert lf["qty"] == Decimal(sf["qty"])
        assert lf["fee"] == Decimal(sf["commission"])
        assert lf["fee_asset"] == sf["commissionAsset"]
        assert lf["side"] == sf["side"]

    # simulator balances == start + ledger fills net of fees
    expected: dict[str, Decimal] = defaultdict(Decimal, START_BALANCES)
    for f in book["fills"]:
        base, quote = f["symbol"][:-4], f["symbol"][-4:]
        notional = f["price"] * f["qty"]
        if f["side"] == "BUY":
            expected[base] += f["qty"]
            expected[quote] -= notional
        else:
            expected[base] -= f["qty"]
            expected[quote] += notional
        expected[f["fee_asset"]] -= f["fee"]
    actual = {
        a: Decimal(str(v["free"])) + Decimal(str(v["locked"]))
        for a, v in _balances(sim_balances).items()
    }
    for asset in set(expected) | set(actual):
        assert actual.get(asset, Decimal(0)) == expected.get(asset, Decimal(0)), asset


def _balances(payload: Any) -> dict[str, dict[str, str]]:
    """Accept either {"ASSET": {"free":..,"locked":..}} or a Binance-style list."""
    if isinstance(payload, dict) and "balances" in payload:
        payload = payload["balances"]
    if isinstance(payload, list):
        return {b["asset"]: {"free": b["free"], "locked": b["locked"]} for b in payload}
    return payload


def _answers(url: str) -> bool:
    with contextlib.suppress(Exception):
        get_json(url)
        return True
    return False
