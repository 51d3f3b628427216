from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from decimal import Decimal

import pytest
import requests

from gridstream.simulator.settings import SettingsError, load_sim_settings


def test_defaults_and_parsing() -> None:
    s = load_sim_settings({})
    assert (s.host, s.port, s.symbols, s.hours, s.speed) == (
        "127.0.0.1",
        8900,
        ("BTCUSDT", "ETHUSDT"),
        24.0,
        1.0,
    )
    assert s.balances == {"USDT": Decimal(700)}
    assert s.wait_for_clients is True
    assert s.lockstep is False
    assert s.data_path.name == "klines"
    s = load_sim_settings(
        {
            "GS_SIM_START": "2026-03-24T00:00:00Z",
            "GS_SIM_BALANCES": "USDT=1000, btc=0.5",
            "GS_SIM_SYMBOLS": "solusdt,XRPUSDT",
            "GS_SIM_WAIT_FOR_CLIENTS": "false",
            "GS_SIM_LOCKSTEP": "true",
        }
    )
    assert s.start_ms == 1774310400000
    assert s.balances == {"USDT": Decimal(1000), "BTC": Decimal("0.5")}
    assert s.symbols == ("SOLUSDT", "XRPUSDT")
    assert s.lockstep is True
    assert load_sim_settings({"GS_SIM_START": "1774310400000"}).start_ms == 1774310400000


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("GS_SIM_PORT", "http"),
        ("GS_SIM_SPEED", "-1"),
        ("GS_SIM_HOURS", "0"),
        ("GS_SIM_START", "yesterday"),
        ("GS_SIM_BALANCES", "USDT"),
        ("GS_SIM_SYMBOLS", "DOGEUSDT"),
        ("GS_SIM_WAIT_FOR_CLIENTS", "maybe"),
        ("GS_SIM_LOCKSTEP", "maybe"),
        ("GS_SIM_MAKER_FEE", "abc"),
        ("GS_SIM_TRADES_PER_CANDLE", "2"),
    ],
)
def test_bad_values_name_the_variable(var: str, value: str) -> None:
    with pytest.raises(SettingsError, match=var):
        load_sim_settings({var: value})


def test_module_entry_point_serves_and_stops_on_sigterm() -> None:
    env = {**os.environ, "GS_SIM_PORT": "0", "GS_SIM_HOURS": "0.1", "GS_SIM_SPEED": "0"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gridstream.simulator"],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        url = None
        deadline = time.monotonic() + 20
        while url is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            m = re.search(r"listening on (http://\S+)", line)
            url = m.group(1) if m else None
        assert url is not None
        assert requests.get(url + "/api/v3/ping", timeout=5).json() == {}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize(("var", "value"), [("GS_SIM_SPEED", "fast"), ("GS_SIM_LOCKSTEP", "maybe")])
def test_bad_setting_exits_with_message(var: str, value: str) -> None:
    env = {**os.environ, var: value}
    r = subprocess.run(
        [sys.executable, "-m", "gridstream.simulator"],
        env=env,
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert r.returncode == 2
    assert var in r.stderr


def test_history_hours_moves_the_default_window_start() -> None:
    from gridstream.simulator.server import build_engine
    from gridstream.simulator.settings import load_sim_settings

    plain = build_engine(load_sim_settings({"GS_SIM_HOURS": "1"}))
    later = build_engine(load_sim_settings({"GS_SIM_HOURS": "1", "GS_SIM_HISTORY_HOURS": "24"}))
    assert later.window_start - plain.window_start == 24 * 3_600_000
