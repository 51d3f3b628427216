"""``gridstream run`` keeps the stack trading while its services are killed one by one.

The whole stack runs under ``gridstream run`` (as ``make run`` starts it) on replayed real
data. Each of the six services in turn is killed with SIGKILL; the supervisor starts it
again (a new pid, up once its own ``/healthz`` answers), the restart is counted, and after
the last one the stack still places orders and books fills.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import asyncpg
import pytest
import redis

from gridstream.cli.run import SERVICES, SUPERVISOR_PORT_OFFSET
from gridstream.cli.supervise import ChildState, Phase, decode_state
from gridstream.common.embedded import free_port, free_ports
from gridstream.common.streams import supervisor_key

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]
SYMBOLS = ("BTCUSDT", "ETHUSDT")
WINDOW_START_MS = 1774310400000  # 2026-03-24 00:00 UTC, as in test_pipeline
HOURS = 24
SPEED = 240  # 24 h of market time in 6 min of wall time: room for six restarts
UP_WITHIN_S = 180


def records(r: redis.Redis) -> dict[str, ChildState]:
    return {k.decode(): decode_state(v) for k, v in r.hgetall(supervisor_key()).items()}


def wait(pred, timeout: float, what: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-60:])
        if proc.poll() is not None:
            raise AssertionError(f"run exited ({proc.returncode}) waiting for {what}\n{tail}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}\n{tail}")
        time.sleep(0.2)


async def counts(database_url: str) -> tuple[int, int]:
    conn = await asyncpg.connect(database_url)
    try:
        orders = await conn.fetchval("SELECT count(*) FROM orders")
        fills = await conn.fetchval("SELECT count(*) FROM fills")
        return int(orders), int(fills)
    finally:
        await conn.close()


def test_every_service_killed_in_turn_comes_back_and_the_stack_keeps_trading(
    redis_url, database_url, tmp_path
):
    base = free_ports(len(SERVICES) + 1)
    sim_port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GS_")}
    env.update(
        REDIS_URL=redis_url,
        DATABASE_URL=database_url,
        GS_SYMBOLS=",".join(SYMBOLS),
        GS_API_KEY="sim-key",
        GS_API_SECRET="sim-secret",
        GS_CLAIM_INTERVAL_S="5",
        GS_BLOCK_MS="100",
        GS_SIM_SYMBOLS=",".join(SYMBOLS),
        GS_SIM_START=str(WINDOW_START_MS),
        GS_SIM_HOURS=str(HOURS),
        GS_SIM_SPEED=str(SPEED),
        GS_SIM_BALANCES="USDT=700",
        GS_ARCHIVE_DIR=str(tmp_path / "archive"),
    )
    log = tmp_path / "run.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gridstream.cli", "run", "--no-exit-on-failure"]
            + ["--sim-port", str(sim_port), "--metrics-base-port", str(base)]
            + ["--restart-cap", "5"],
            env=env,
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    r = redis.Redis.from_url(redis_url)
    try:

        def all_up() -> bool:
            recs = records(r)
            return all(n in recs and recs[n].phase == Phase.UP for n in ("simulator", *SERVICES))

        wait(all_up, UP_WITHIN_S, "every child up", proc, log)
        wait(
            lambda: asyncio.run(counts(database_url))[0] > 0,
            UP_WITHIN_S,
            "the first orders",
            proc,
            log,
        )
        for n, name in enumerate(SERVICES, start=1):
            old = records(r)[name]
            assert old.pid is not None
            os.kill(old.pid, signal.SIGKILL)

            def back(name: str = name, old_pid: int = old.pid) -> bool:
                st = records(r).get(name)
                return st is not None and st.phase == Phase.UP and st.pid not in (None, old_pid)

            wait(back, UP_WITHIN_S, f"{name} to come back after SIGKILL #{n}", proc, log)
            st = records(r)[name]
            assert st.restarts == old.restarts + 1
            assert st.last_exit_code == -signal.SIGKILL
            assert proc.poll() is None  # the stack did not stop
        orders0, fills0 = asyncio.run(counts(database_url))

        def trades_on() -> bool:
            orders, fills = asyncio.run(counts(database_url))
            return orders > orders0 and fills > fills0

        wait(trades_on, 300, "new orders and fills after the last restart", proc, log)
        with urllib.request.urlopen(
            f"http://127.0.0.1:{base + SUPERVISOR_PORT_OFFSET}/metrics", timeout=5
        ) as resp:
            text = resp.read().decode()
        for name in SERVICES:
            assert f'gridstream_service_restarts_total{{service="{name}"}} 1.0' in text
        report = json.loads(
            subprocess.run(
                [sys.executable, "-m", "gridstream.cli", "status", "--json"],
                env={**env, "REDIS_URL": redis_url},
                capture_output=True,
                text=True,
                timeout=60,
                check=True,
            ).stdout
        )
        sup = {row["service"]: row for row in report["supervisor"]}
        assert all(sup[name]["restarts"] == 1 and sup[name]["phase"] == "up" for name in SERVICES)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(120) == 0, log.read_text(errors="replace")[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
