from __future__ import annotations

import msgspec
import pytest

from gridstream.common.settings import CommonSettings, SettingsError, env_name, load_settings


class Sample(CommonSettings, frozen=True, kw_only=True, forbid_unknown_fields=True):
    api_secret: str = ""
    order_quote: float = 20.0


def test_defaults_trade_nothing_real():
    s = load_settings(CommonSettings, {})
    assert s.mode == "replay" and s.venue == "simulator"


def test_values_come_from_prefixed_env_and_lists_split_on_commas():
    s = load_settings(
        Sample,
        {
            "GS_SYMBOLS": "BTCUSDT, ETHUSDT,SOLUSDT",
            "GS_BATCH_SIZE": "42",
            "REDIS_URL": "redis://r:6379/1",
            "GS_ORDER_QUOTE": "12.5",
        },
    )
    assert s.symbols == ["BTCUSDT", "ETHUSDT", "SOLUSDT"]
    assert s.batch_size == 42 and s.order_quote == 12.5 and s.redis_url == "redis://r:6379/1"
    assert env_name("redis_url") == "REDIS_URL" and env_name("batch_size") == "GS_BATCH_SIZE"


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"GS_BATCH_SIZE": "many"}, "GS_BATCH_SIZE"),
        ({"GS_MODE": "moon"}, "GS_MODE"),
        ({"GS_BATCH_SIZE": "0"}, "GS_BATCH_SIZE"),
        ({"GS_METRICS_PORT": "70000"}, "GS_METRICS_PORT"),
        ({"GS_SYMBOLS": ""}, "GS_SYMBOLS"),
        ({"GS_MODE": "live"}, "GS_MODE"),
    ],
)
def test_an_invalid_value_names_the_variable(env, named):
    with pytest.raises(SettingsError, match=named):
        load_settings(CommonSettings, env)


def test_secret_files_are_read_and_secrets_never_shown(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("s3cr3t-value\n")
    s = load_settings(
        Sample, {"GS_API_SECRET_FILE": str(secret), "DATABASE_URL": "postgresql://u:pa55@db/x"}
    )
    assert s.api_secret == "s3cr3t-value"
    text = repr(s)
    assert "s3cr3t" not in text and "pa55" not in text


def test_missing_secret_file_is_a_clear_error(tmp_path):
    with pytest.raises(SettingsError, match="GS_API_SECRET_FILE"):
        load_settings(Sample, {"GS_API_SECRET_FILE": str(tmp_path / "missing")})


def test_settings_are_frozen():
    s = load_settings(CommonSettings, {})
    with pytest.raises(AttributeError):
        s.mode = "live"  # type: ignore[misc]
    assert isinstance(s, msgspec.Struct)


LIVE_URLS = {
    "GS_VENUE_REST_URL": "https://api.binance.com",
    "GS_VENUE_WS_URL": "wss://stream.binance.com:9443",
}


def test_live_needs_an_explicit_confirmation():
    with pytest.raises(SettingsError, match="GS_MODE"):
        load_settings(CommonSettings, {"GS_MODE": "live", "GS_VENUE": "binance", **LIVE_URLS})
    s = load_settings(
        CommonSettings,
        {
            "GS_MODE": "live",
            "GS_VENUE": "binance",
            "GS_LIVE_TRADING_CONFIRMED": "true",
            **LIVE_URLS,
        },
    )
    assert s.mode == "live"


@pytest.mark.parametrize(
    ("env", "named"),
    [
        # real-exchange URLs under the simulator label: refused, whatever the mode
        ({"GS_VENUE_REST_URL": "https://api.binance.com"}, "GS_VENUE_REST_URL"),
        (
            {"GS_MODE": "paper", "GS_VENUE_WS_URL": "wss://stream.binance.com:9443"},
            "GS_VENUE_WS_URL",
        ),
        ({"GS_VENUE_REST_URL": "https://testnet.binance.vision"}, "GS_VENUE_REST_URL"),
        # a real venue label with local URLs: refused
        ({"GS_MODE": "testnet", "GS_VENUE": "binance-testnet"}, "GS_VENUE_REST_URL"),
        # the real exchange outside live/paper: refused
        (
            {
                "GS_MODE": "replay",
                "GS_VENUE": "binance",
                "GS_VENUE_REST_URL": "https://api.binance.com",
                "GS_VENUE_WS_URL": "wss://stream.binance.com:9443",
            },
            "GS_VENUE",
        ),
    ],
)
def test_venue_urls_must_match_the_venue_label(env, named):
    with pytest.raises(SettingsError, match=named):
        load_settings(CommonSettings, env)


def test_matching_venue_and_urls_load():
    s = load_settings(
        CommonSettings,
        {
            "GS_MODE": "testnet",
            "GS_VENUE": "binance-testnet",
            "GS_VENUE_REST_URL": "https://testnet.binance.vision",
            "GS_VENUE_WS_URL": "wss://stream.testnet.binance.vision",
        },
    )
    assert s.venue == "binance-testnet"
    assert load_settings(CommonSettings, {"GS_VENUE_REST_URL": "http://simulator:8900"}).venue == (
        "simulator"
    )
