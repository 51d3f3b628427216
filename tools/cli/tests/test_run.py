"""``gridstream run`` as a real process: comes up, prefixes lines, stops everything."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import aiohttp
import asyncpg
import psutil
import pytest
import redis as sync_redis
from aiohttp import web

from gridstream.cli.run import SUPERVISOR_PORT_OFFSET, SupervisorError, health_pid, port_taken
from gridstream.cli.supervise import decode_state
from gridstream.common.streams import Service, heartbeat_key, supervisor_key

STARTED = re.compile(r"^run\s+\| started (\w+) pid (\d+)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Runner:
    """``python -m gridstream.cli run ...`` with its output collected line by line."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gridstream.cli", "run", *args],
            env=env,
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._q: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._q.put(line.rstrip("\n"))
        self._q.put(None)

    def wait_for(self, pattern: str, timeout: float = 60, *, after: int = 0) -> str:
        """The first line matching ``pattern`` (of those from index ``after`` on)."""
        rx = re.compile(pattern)
        for line in self.lines[after:]:
            if rx.search(line):
                return line
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._q.get(timeout=0.2)
            except queue.Empty:
                continue
            if line is None:
                break
            self.lines.append(line)
            if rx.search(line):
                return line
        raise AssertionError(f"no line matching {pattern!r}; output:\n" + "\n".join(self.lines))

    def finish(self, timeout: float = 60) -> int:
        code = self.proc.wait(timeout)
        while True:
            line = self._q.get(timeout=5)
            if line is None:
                return code
            self.lines.append(line)

    def pids(self) -> dict[str, int]:
        return {m[1]: int(m[2]) for line in self.lines if (m := STARTED.match(line))}

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def get_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return str(resp.read().decode())


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}
    env.update(extra)
    return env


def test_run_subset_comes_up_prefixes_lines_and_stops_on_sigint(redis_url, database_url, tmp_path):
    base = free_port() - 5  # the archiver's metrics port (base + 5) is known to be free
    env = base_env(
        REDIS_URL=redis_url,
        DATABASE_URL=database_url,
        GS_SYMBOLS="BTCUSDT",
        GS_ARCHIVE_DIR=str(tmp_path / "archive"),
        GS_SIM_SYMBOLS="BTCUSDT",
    )
    sim_port = free_port()
    r = Runner(
        [
            "--services",
            "simulator,archiver",
            "--sim-port",
            str(sim_port),
            "--metrics-base-port",
            str(base),
        ],
        env,
        tmp_path,
    )
    try:
        r.wait_for(r"^run\s+\| running simulator, archiver")
        r.wait_for(r"^simulator \| .*listening on http://127\.0\.0\.1:" + str(sim_port))
        r.wait_for(r"^archiver\s+\| .*metrics on http://127\.0\.0\.1:" + str(base + 5))
        client = sync_redis.Redis.from_url(redis_url)
        deadline = time.monotonic() + 30
        while not client.exists(heartbeat_key(Service.ARCHIVER.value, "0")):
            assert time.monotonic() < deadline, "archiver never wrote its heartbeat"
            time.sleep(0.1)
        pids = r.pids()
        assert set(pids) == {"simulator", "archiver"}
        assert all(not gone(p) for p in pids.values())
        r.proc.send_signal(signal.SIGINT)
        assert r.finish() == 0, "\n".join(r.lines)
    finally:
        r.kill()
    assert all(gone(p) for p in pids.values())
    assert any(re.match(r"^run\s+\| all stopped", x) for x in r.lines)
    assert any(re.match(r"^run\s+\| archiver stopped \(exit code 0\)", x) for x in r.lines)
    # every line carries a padded service prefix
    assert all(re.match(r"^(run|simulator|archiver)\s*\| ", x) for x in r.lines), r.lines
    assert not (tmp_path / ".data").exists()  # URLs given: no embedded servers


def test_a_dying_child_stops_the_rest(redis_url, database_url, tmp_path):
    env = base_env(REDIS_URL=redis_url, DATABASE_URL=database_url, GS_FLUSH_ROWS="0")
    r = Runner(["--services", "archiver", "--metrics-base-port", str(free_port())], env, tmp_path)
    try:
        code = r.finish(60)
    finally:
        r.kill()
    text = "\n".join(r.lines)
    assert code == 1, text
    assert re.search(r"archiver \(pid \d+\) DIED with exit code 2", text)
    assert "GS_FLUSH_ROWS" in text


def test_run_with_embedded_servers_keeps_data_between_runs(tmp_path):
    data = tmp_path / "data"
    env = base_env()
    r1 = Runner(
        [
            "--services",
            "archiver",
            "--data-dir",
            str(data),
            "--metrics-base-port",
            str(free_port()),
        ],
        env,
        tmp_path,
    )
    try:
        r1.wait_for(r"^archiver\s+\| .*metrics on", timeout=120)
        line = r1.wait_for(r"^run\s+\| DATABASE_URL=")
        db_url = line.split("DATABASE_URL=", 1)[1]
        assert db_url.endswith("/gridstream")
        assert r1.wait_for(r"created database gridstream")

        async def tables() -> set[str]:
            conn = await asyncpg.connect(db_url)
            try:
                rows = await conn.fetch("SELECT tablename FROM pg_tables")
                return {row["tablename"] for row in rows}
            finally:
                await conn.close()

        assert "schema_migrations" in asyncio.run(tables())
        redis_line = r1.wait_for(r"^run\s+\| REDIS_URL=")
        redis_url = redis_line.split("REDIS_URL=", 1)[1]
        marker = uuid.uuid4().hex
        sync_redis.Redis.from_url(redis_url).set("gs:test:marker", marker)
        r1.proc.send_signal(signal.SIGTERM)
        assert r1.finish() == 0, "\n".join(r1.lines)
    finally:
        r1.kill()
    assert any("embedded postgres stopped" in x for x in r1.lines)
    assert any("embedded valkey stopped" in x for x in r1.lines)
    pg_port = int(db_url.rsplit(":", 1)[1].split("/")[0])
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", pg_port)) != 0  # postgres is down

    r2 = Runner(
        [
            "--services",
            "archiver",
            "--data-dir",
            str(data),
            "--metrics-base-port",
            str(free_port()),
        ],
        env,
        tmp_path,
    )
    try:
        r2.wait_for(r"^run\s+\| running archiver", timeout=120)
        redis_url2 = r2.wait_for(r"^run\s+\| REDIS_URL=").split("REDIS_URL=", 1)[1]
        assert sync_redis.Redis.from_url(redis_url2).get("gs:test:marker") == marker.encode()
        r2.proc.send_signal(signal.SIGINT)
        assert r2.finish() == 0
    finally:
        r2.kill()
    assert not any("created database" in x for x in r2.lines)
    assert all(gone(p) for p in r2.pids().values())


def test_migrate_creates_and_migrates_the_database(database_url):
    name = f"gs_cli_{uuid.uuid4().hex[:10]}"
    url = database_url.rsplit("/", 1)[0] + f"/{name}"
    env = base_env(DATABASE_URL=url)
    out = subprocess.run(
        [sys.executable, "-m", "gridstream.cli", "migrate"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "applied: 0001_init.sql" in out.stdout
    again = subprocess.run(
        [sys.executable, "-m", "gridstream.cli", "migrate"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert "up to date" in again.stdout

    async def drop() -> None:
        conn = await asyncpg.connect(database_url.rsplit("/", 1)[0] + "/postgres")
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

    asyncio.run(drop())


def started_pids(r: Runner, name: str) -> list[int]:
    return [int(m[2]) for line in r.lines if (m := STARTED.match(line)) and m[1] == name]


def supervisor_record(redis_url: str, name: str) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-m", "gridstream.cli", "status", "--json"],
        env=base_env(REDIS_URL=redis_url),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    rows = {row["service"]: row for row in json.loads(out.stdout)["supervisor"]}
    return rows[name]


def wait_phase(redis_url: str, name: str, phase: str, pid: int, timeout: float = 90) -> None:
    key = supervisor_key()
    client = sync_redis.Redis.from_url(redis_url)
    deadline = time.monotonic() + timeout
    while True:
        raw = client.hget(key, name)
        if raw is not None:
            st = decode_state(raw)
            if st.phase == phase and st.pid == pid:
                return
        assert time.monotonic() < deadline, f"{name} never {phase} with pid {pid}: {raw!r}"
        time.sleep(0.05)


def test_a_killed_child_comes_back_and_a_crash_loop_shows(redis_url, database_url, tmp_path):
    base = free_port() - 5
    env = base_env(
        REDIS_URL=redis_url,
        DATABASE_URL=database_url,
        GS_SYMBOLS="BTCUSDT",
        GS_ARCHIVE_DIR=str(tmp_path / "archive"),
    )
    r = Runner(["--services", "archiver", "--metrics-base-port", str(base)], env, tmp_path)
    try:
        r.wait_for(r"^run\s+\| started archiver pid")
        for n in range(1, 4):
            pid = started_pids(r, "archiver")[-1]
            wait_phase(redis_url, "archiver", "up", pid)
            seen = len(r.lines)
            os.kill(pid, signal.SIGKILL)
            r.wait_for(rf"archiver \(pid {pid}\) DIED with killed by SIGKILL", after=seen)
            r.wait_for(rf"restarting archiver in [\d.]+s \(restart {n}\)", after=seen)
            r.wait_for(r"^run\s+\| started archiver pid", timeout=60, after=seen)
            assert len(started_pids(r, "archiver")) == n + 1
        # three quick deaths in a row: a crash loop, said in the log and in status
        assert any("CRASH LOOP: 3 quick deaths in a row" in x for x in r.lines), r.lines
        pid = started_pids(r, "archiver")[-1]
        wait_phase(redis_url, "archiver", "up", pid)
        rec = supervisor_record(redis_url, "archiver")
        assert rec["restarts"] == 3
        assert rec["crash_loop"] is True
        assert rec["last_exit_text"] == "killed by SIGKILL"
        assert str(rec["crash_loop_text"]).startswith("crash loop: 3 restarts in the last")
        human = subprocess.run(
            [sys.executable, "-m", "gridstream.cli", "status"],
            env=base_env(REDIS_URL=redis_url),
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        row = next(x for x in human.splitlines() if x.startswith("archiver") and "CRASH" in x)
        assert "up CRASH-LOOP" in row and str(pid) in row
        text = get_text(f"http://127.0.0.1:{base + SUPERVISOR_PORT_OFFSET}/metrics")
        assert 'gridstream_service_restarts_total{service="archiver"} 3.0' in text
        assert 'gridstream_service_crash_loop{service="archiver"} 1.0' in text
        r.proc.send_signal(signal.SIGINT)
        assert r.finish() == 0, "\n".join(r.lines)
    finally:
        r.kill()
    assert all(gone(p) for p in started_pids(r, "archiver"))
    assert (
        decode_state(
            sync_redis.Redis.from_url(redis_url).hget(supervisor_key(), "archiver") or b"{}"
        ).phase
        == "stopped"
    )


def test_a_taken_port_stops_the_stack_before_anything_starts(redis_url, database_url, tmp_path):
    env = base_env(REDIS_URL=redis_url, DATABASE_URL=database_url)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        r = Runner(
            ["--services", "simulator,archiver", "--sim-port", str(port)]
            + ["--metrics-base-port", str(free_port())],
            env,
            tmp_path,
        )
        try:
            code = r.finish(60)
        finally:
            r.kill()
    text = "\n".join(r.lines)
    assert code == 1, text
    assert f"cannot start simulator: port {port} is taken by pid {os.getpid()}" in text
    assert not r.pids(), text  # nothing was started against the other process


def test_health_check_tells_our_child_from_another_process():
    async def go() -> None:
        async def foreign(_: web.Request) -> web.Response:
            return web.json_response({"status": "ok", "pid": 1})

        async def not_ours(_: web.Request) -> web.Response:
            return web.Response(text="hello")

        app = web.Application()
        app.router.add_get("/healthz", foreign)
        other = web.Application()
        other.router.add_get("/healthz", not_ours)
        runners = [web.AppRunner(app), web.AppRunner(other)]
        ports = []
        for runner in runners:
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            ports.append(runner.addresses[0][1])
        try:
            async with aiohttp.ClientSession() as session:
                assert await health_pid(session, "x", "127.0.0.1", ports[0]) == 1
                with pytest.raises(SupervisorError, match="not a gridstream process"):
                    await health_pid(session, "x", "127.0.0.1", ports[1])
                assert await health_pid(session, "x", "127.0.0.1", free_port()) is None
            assert port_taken("127.0.0.1", ports[0]) is not None
        finally:
            for runner in runners:
                await runner.cleanup()
        assert port_taken("127.0.0.1", ports[0]) is None

    asyncio.run(go())
