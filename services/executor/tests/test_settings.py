"""Executor settings: secrets from env or files, never shown; live needs the guard."""

from __future__ import annotations

from pathlib import Path

import pytest

from gridstream.common.settings import SettingsError, load_settings
from gridstream.executor.settings import ExecutorSettings

TESTNET = {
    "GS_VENUE": "binance-testnet",
    "GS_MODE": "testnet",
    "GS_VENUE_REST_URL": "https://testnet.binance.vision",
    "GS_VENUE_WS_URL": "wss://stream.testnet.binance.vision",
}
LIVE = {
    "GS_VENUE": "binance",
    "GS_MODE": "live",
    "GS_VENUE_REST_URL": "https://api.binance.com",
    "GS_VENUE_WS_URL": "wss://stream.binance.com:9443",
}


def test_paper_mode_is_refused_until_a_paper_venue_exists() -> None:
    with pytest.raises(SettingsError, match="GS_MODE"):
        load_settings(ExecutorSettings, {"GS_MODE": "paper"})


def test_secrets_from_files_are_not_in_repr(tmp_path: Path) -> None:
    key = tmp_path / "key"
    secret = tmp_path / "secret"
    key.write_text("my-key-123\n")
    secret.write_text("my-secret-456\n")
    s = load_settings(
        ExecutorSettings,
        {
            **TESTNET,
            "GS_API_KEY_FILE": str(key),
            "GS_API_SECRET_FILE": str(secret),
        },
    )
    assert (s.key, s.secret) == ("my-key-123", "my-secret-456")
    assert "my-secret-456" not in repr(s)
    assert "my-key-123" not in repr(s)


def test_testnet_without_keys_is_refused() -> None:
    with pytest.raises(SettingsError, match="GS_API_KEY"):
        load_settings(ExecutorSettings, TESTNET)


def test_live_needs_the_common_guard() -> None:
    env = {**LIVE, "GS_API_KEY": "k", "GS_API_SECRET": "s"}
    with pytest.raises(SettingsError, match="GS_LIVE_TRADING_CONFIRMED"):
        load_settings(ExecutorSettings, env)
    confirmed = {**env, "GS_LIVE_TRADING_CONFIRMED": "true"}
    assert load_settings(ExecutorSettings, confirmed).mode == "live"
    # real-money venue without live mode is refused too
    with pytest.raises(SettingsError, match="GS_VENUE"):
        load_settings(ExecutorSettings, {**confirmed, "GS_MODE": "replay"})


def test_simulator_defaults_to_its_own_credentials() -> None:
    s = load_settings(ExecutorSettings, {})
    assert s.venue == "simulator"
    assert s.key == "sim-key"
