"""``gridstream lockstep``: its arguments, and what it says against a real simulator (its
own process on a free port, lockstep on) with real Redis and Postgres and no stack."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from gridstream.cli.main import build_parser, main
from gridstream.common.embedded import free_port

UP_WITHIN_S = 30


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.load(resp)


class Simulator:
    """``python -m gridstream.simulator`` on a free port with the given settings."""

    def __init__(self, **env: str) -> None:
        full = {k: v for k, v in os.environ.items() if not k.startswith("GS_")}
        full.update({"GS_SIM_PORT": "0", "GS_SIM_HOURS": "0.05", "GS_SIM_SPEED": "0", **env})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gridstream.simulator"],
            env=full,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stderr is not None
        url = None
        deadline = time.monotonic() + UP_WITHIN_S
        while url is None and time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line and self.proc.poll() is not None:
                break
            m = re.search(r"listening on (http://\S+)", line)
            url = m.group(1) if m else None
        assert url is not None, "the simulator did not come up"
        self.url: str = url

    def status(self) -> Any:
        return get_json(self.url + "/sim/status")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def simulator() -> Iterator[type[Simulator]]:
    started: list[Simulator] = []

    class Started(Simulator):
        def __init__(self, **env: str) -> None:
            super().__init__(**env)
            started.append(self)

    yield Started
    for s in started:
        s.stop()


@pytest.fixture
def stack_env(redis_url: str, database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh Redis database and a fresh migrated Postgres database, as the command's
    environment."""
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("DATABASE_URL", database_url)


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(["lockstep", *argv])
    out, err = capsys.readouterr()
    return int(exc.value.code or 0), out, err


def test_defaults_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("GS_VENUE_REST_URL", "GS_SIM_PORT", "GS_SYMBOLS"):
        monkeypatch.delenv(var, raising=False)
    args = build_parser().parse_args(["lockstep"])
    assert (args.sim, args.symbols) == ("http://127.0.0.1:8900", "BTCUSDT,ETHUSDT")
    assert (args.barrier_timeout, args.progress_every) == (60.0, 10.0)
    monkeypatch.setenv("GS_SIM_PORT", "8950")
    monkeypatch.setenv("GS_SYMBOLS", "SOLUSDT,XRPUSDT")
    args = build_parser().parse_args(["lockstep", "--barrier-timeout", "2.5"])
    assert (args.sim, args.symbols, args.barrier_timeout) == (
        "http://127.0.0.1:8950",
        "SOLUSDT,XRPUSDT",
        2.5,
    )
    monkeypatch.setenv("GS_VENUE_REST_URL", "http://sim.local:9000")
    assert build_parser().parse_args(["lockstep"]).sim == "http://sim.local:9000"
    args = build_parser().parse_args(["lockstep", "--sim", "http://h:1", "--symbols", "a,b"])
    assert (args.sim, args.symbols) == ("http://h:1", "a,b")


@pytest.mark.parametrize("value", ["0", "-1", "soon", "inf", "nan"])
def test_a_barrier_timeout_that_is_no_positive_number_is_refused(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(["--barrier-timeout", value], capsys)
    assert code == 2
    assert "--barrier-timeout" in err


def test_no_simulator_there(stack_env: None, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    code, _, err = run(["--sim", url, "--barrier-timeout", "1"], capsys)
    assert code == 1
    assert f"gridstream lockstep: no simulator answers at {url}" in err


def test_a_simulator_not_in_lockstep_is_refused(
    simulator: type[Simulator], stack_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    sim = simulator()
    code, _, err = run(["--sim", sim.url, "--barrier-timeout", "1"], capsys)
    assert code == 1
    assert "does not replay in lockstep (start it with GS_SIM_LOCKSTEP=true)" in err


def test_waits_at_barrier_1_then_gives_up_with_the_reason(
    simulator: type[Simulator], stack_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    # no market-data client ever connects: the replay never reaches its first barrier
    sim = simulator(GS_SIM_LOCKSTEP="true")
    code, out, err = run(["--sim", sim.url, "--barrier-timeout", "1"], capsys)
    assert code == 1
    assert f"lockstep replay of {sim.url}: " in out
    assert "symbols BTCUSDT,ETHUSDT, now at barrier 0" in out
    assert err.strip() == (
        "gridstream lockstep: not settled after 1s at barrier 1: the simulator's replay"
        " has not started (it waits for a market-data client)"
    )
    st = sim.status()
    assert (st["barrier"], st["paused"], st["started"]) == (0, False, False)


def test_waits_at_barrier_1_for_the_stack_then_gives_up_with_the_reason(
    simulator: type[Simulator], stack_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    # the replay starts by itself and waits at barrier 1; no executor listens to the account
    sim = simulator(GS_SIM_LOCKSTEP="true", GS_SIM_WAIT_FOR_CLIENTS="false", GS_SIM_SPEED="60")
    code, _, err = run(["--sim", sim.url, "--barrier-timeout", "1"], capsys)
    assert code == 1
    assert err.strip() == (
        "gridstream lockstep: not settled after 1s at barrier 1:"
        " no user data stream is connected to the simulator (is the executor up?)"
    )
    st = sim.status()
    assert (st["barrier"], st["paused"], st["pause_phase"]) == (1, True, "start")
    assert st["closed_candles"] == {"BTCUSDT": 0, "ETHUSDT": 0}


class UserStream:
    """A user data stream held open on the simulator from a thread of its own (what the
    executor keeps), so the simulator counts a user client."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.task = asyncio.run_coroutine_threadsafe(self._hold(), self.loop)
        assert self.ready.wait(UP_WITHIN_S), "no user data stream"

    async def _hold(self) -> None:
        async with aiohttp.ClientSession(headers={"X-MBX-APIKEY": "sim-key"}) as http:
            async with http.post(self.url + "/api/v3/userDataStream") as r:
                key = (await r.json())["listenKey"]
            async with http.ws_connect(f"{self.url}/ws/{key}") as ws:
                self.ws = ws
                self.ready.set()
                async for _ in ws:
                    pass

    async def _close(self) -> None:
        if self.ws is not None:
            await self.ws.close()

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._close(), self.loop).result(10)
        self.task.result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def test_resumes_a_settled_start_then_gives_up_without_the_stack_s_candles(
    simulator: type[Simulator], stack_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    # with an account listener and nothing else, Redis, the ledger and the venue agree at
    # the start (nothing anywhere), so barrier 1 is resumed; after the first minute's
    # closes nobody has written the candles
    sim = simulator(GS_SIM_LOCKSTEP="true", GS_SIM_WAIT_FOR_CLIENTS="false", GS_SIM_SPEED="60")
    user = UserStream(sim.url)
    try:
        code, _, err = run(["--sim", sim.url, "--barrier-timeout", "1"], capsys)
    finally:
        user.close()
    assert code == 1
    assert err.strip() == (
        "gridstream lockstep: not settled after 1s at barrier 2:"
        " gs:candles:BTCUSDT: 0 of 1 candles (1 barrier(s) resumed, the last 1)"
    )
    st = sim.status()
    assert (st["barrier"], st["paused"], st["pause_phase"]) == (2, True, "closes")
    assert st["closed_candles"] == {"BTCUSDT": 1, "ETHUSDT": 1}
