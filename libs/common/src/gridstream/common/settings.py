"""Settings from the environment (and secret files) into frozen msgspec Structs.

A field ``foo_bar`` is read from ``GS_FOO_BAR``; the few fields listed in
:data:`UNPREFIXED` (``redis_url``, ``database_url``) are read from their
conventional names. ``<NAME>_FILE`` names a file holding the value (Docker and
Kubernetes secrets). Lists are comma separated. Any invalid value raises
:class:`SettingsError` naming the variable, so a service stops at start.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final, Literal, TypeVar, get_args, get_origin, get_type_hints
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import msgspec

from gridstream.common.settings_reference import BY_NAME
from gridstream.common.streams import (
    DEAD_LETTER_KIND,
    DEFAULT_BOUNDS,
    DEFAULT_MAX_ENTRY_BYTES,
    Kind,
)

#: Default socket timeout of a Redis client (seconds): above the longest blocking read.
REDIS_SOCKET_TIMEOUT_S: Final = 15.0

ENV_PREFIX: Final = "GS_"
UNPREFIXED: Final = frozenset({"redis_url", "database_url"})
SECRET_FIELDS: Final = frozenset({"api_key", "api_secret", "database_url", "redis_url"})
#: Query parameters of a URL whose value is masked in logs and ``gridstream config``.
_SECRET_WORDS: Final = ("password", "secret", "token", "key")

Mode = Literal["backtest", "replay", "paper", "testnet", "live"]

T = TypeVar("T", bound=msgspec.Struct)


#: Hosts of the real exchange (real money) and of its spot testnet.
BINANCE_LIVE_HOST_SUFFIXES: Final = ("binance.com", "binance.us")
BINANCE_TESTNET_HOST_SUFFIXES: Final = ("testnet.binance.vision",)


def venue_of_host(url: str) -> str | None:
    """Which real venue a URL points at: ``binance``, ``binance-testnet`` or None."""
    host = (urlsplit(url).hostname or "").lower()

    def under(suffixes: tuple[str, ...]) -> bool:
        return any(host == sfx or host.endswith("." + sfx) for sfx in suffixes)

    if under(BINANCE_TESTNET_HOST_SUFFIXES):
        return "binance-testnet"
    if under(BINANCE_LIVE_HOST_SUFFIXES):
        return "binance"
    return None


class SettingsError(ValueError):
    """A setting is missing or invalid; the message names the variable."""


def env_name(field: str) -> str:
    """The environment variable that holds a settings field."""
    return field.upper() if field in UNPREFIXED else f"{ENV_PREFIX}{field.upper()}"


def _is_list(tp: Any) -> bool:
    origin = get_origin(tp)
    if origin in (list, tuple, frozenset, set):
        return True
    if origin is not None:
        return any(_is_list(a) for a in get_args(tp) if a is not type(None))
    return False


def _raw(name: str, env: Mapping[str, str]) -> str | None:
    if name in env:
        return env[name]
    file_name = f"{name}_FILE"
    if file_name in env:
        path = Path(env[file_name])
        try:
            return path.read_text().strip()
        except OSError as exc:
            raise SettingsError(f"{file_name}: cannot read secret file {path}: {exc}") from exc
    return None


#: Suffix of a variable naming a file that holds the value (Docker/Kubernetes secrets).
FILE_SUFFIX: Final = "_FILE"
#: Parts whose variables are read directly, without the ``_FILE`` variant.
NO_FILE_VARIANT: Final = frozenset({"simulator", "deploy"})


def unknown_variables(env: Mapping[str, str]) -> list[str]:
    """The ``GS_*`` variables of ``env`` that no part of gridstream reads."""
    out = []
    for name in env:
        if not name.startswith(ENV_PREFIX):
            continue
        if name in BY_NAME:
            continue
        base = name.removesuffix(FILE_SUFFIX) if name.endswith(FILE_SUFFIX) else None
        # ``<NAME>_FILE`` is read for the settings classes' fields only (load_settings)
        known = BY_NAME.get(base) if base is not None else None
        if known is None or not known.field or set(known.owners) & NO_FILE_VARIANT:
            out.append(name)
    return sorted(out)


def check_environment(env: Mapping[str, str] | None = None) -> None:
    """Refuse a ``GS_*`` variable no part of gridstream reads (a misspelling would
    otherwise run with the default), naming it and the nearest known name."""
    env = os.environ if env is None else env
    unknown = unknown_variables(env)
    if not unknown:
        return
    parts = []
    for name in unknown:
        near = difflib.get_close_matches(name, list(BY_NAME), n=1, cutoff=0.6)
        hint = f" (did you mean {near[0]}?)" if near else ""
        parts.append(f"{name} is not a gridstream setting{hint}")
    raise SettingsError("; ".join(parts) + " (every setting: docs/settings.md)")


def load_settings(cls: type[T], env: Mapping[str, str] | None = None) -> T:
    """Build ``cls`` from the environment, or raise :class:`SettingsError` naming the variable.

    A ``GS_*`` variable that no part of gridstream reads is refused too
    (:func:`check_environment`).
    """
    env = os.environ if env is None else env
    check_environment(env)
    hints = get_type_hints(cls)
    raw: dict[str, Any] = {}
    for field in msgspec.structs.fields(cls):
        name = env_name(field.name)
        value = _raw(name, env)
        if value is None:
            continue
        if _is_list(hints[field.name]):
            raw[field.name] = [item.strip() for item in value.split(",") if item.strip()]
        else:
            raw[field.name] = value
    try:
        return msgspec.convert(raw, cls, strict=False)
    except msgspec.ValidationError as exc:
        text = str(exc)
        for field in msgspec.structs.fields(cls):
            if f"`$.{field.name}`" in text or f"`$.{field.name}[" in text:
                shown = "<secret>" if field.name in SECRET_FIELDS else repr(raw.get(field.name))
                raise SettingsError(
                    f"{env_name(field.name)}={shown}: {text.split(' - at ')[0]}"
                ) from None
        missing = [
            env_name(f.name)
            for f in msgspec.structs.fields(cls)
            if f.required and f.name not in raw
        ]
        if missing:
            raise SettingsError(f"missing required setting(s): {', '.join(missing)}") from None
        if text.startswith(ENV_PREFIX):
            raise SettingsError(text) from None
        raise SettingsError(f"invalid settings for {cls.__name__}: {text}") from None


def redact_url(url: str) -> str:
    """A URL with any password replaced (in the user part or the query), safe to log."""
    if "://" not in url:
        return url
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        creds, host = netloc.rsplit("@", 1)
        user = creds.split(":", 1)[0]
        netloc = f"{user}:***@{host}" if ":" in creds else f"{user}@{host}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = "&".join(
            f"{k}={'***' if any(w in k.lower() for w in _SECRET_WORDS) else v}" for k, v in pairs
        )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


class CommonSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Settings every service shares. Services extend it with their own fields."""

    #: Redis (streams, leases, heartbeats); read from ``REDIS_URL``.
    redis_url: str = "redis://localhost:6379/0"
    #: Postgres (the ledger); read from ``DATABASE_URL``.
    database_url: str = "postgresql://postgres@localhost:5432/gridstream"
    #: What the stack trades against: ``replay``/``paper`` trade nothing real; ``live``
    #: needs ``GS_LIVE_TRADING_CONFIRMED=true`` and a live venue.
    mode: Mode = "replay"
    #: The symbols traded, comma separated.
    symbols: list[str] = msgspec.field(default_factory=lambda: ["BTCUSDT", "ETHUSDT"])
    #: This replica's id, unique per service (a duplicate is refused at start); empty:
    #: the lowest free id is taken at start (``0``, ``1``, ...).
    replica: str = ""
    #: Address of the /metrics, /healthz and /readyz server.
    metrics_host: str = "127.0.0.1"
    #: Its port (0: any free port).
    metrics_port: int = 0
    #: ``json`` lines, ``text``, or ``auto`` (text on a terminal, else json).
    log_format: Literal["auto", "json", "text"] = "auto"
    #: Lowest level logged.
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    #: Entries read per XREADGROUP.
    batch_size: int = 500
    #: Longest blocking read (ms) before the consumer loop turns again.
    block_ms: int = 1000
    #: Deliveries of a failing entry before it is dead-lettered.
    max_deliveries: int = 5
    #: Idle time (ms) after which a dead consumer's pending entries are reclaimed.
    claim_idle_ms: int = 60_000
    #: How often pending entries are checked for reclaim (seconds).
    claim_interval_s: float = 15.0
    #: Hard bound per stream kind (XADD MAXLEN ~): Redis memory's guard. A consumer that
    #: falls this far behind loses entries, recorded as lost (metric and log line).
    stream_maxlen_ticks: int = DEFAULT_BOUNDS[Kind.TICKS]
    #: Bound of each candle stream (entries).
    stream_maxlen_candles: int = DEFAULT_BOUNDS[Kind.CANDLES]
    #: Bound of each signal stream.
    stream_maxlen_signals: int = DEFAULT_BOUNDS[Kind.SIGNALS]
    #: Bound of each intent stream.
    stream_maxlen_intents: int = DEFAULT_BOUNDS[Kind.INTENTS]
    #: Bound of each order (verdict) stream.
    stream_maxlen_orders: int = DEFAULT_BOUNDS[Kind.ORDERS]
    #: Bound of each execution stream.
    stream_maxlen_executions: int = DEFAULT_BOUNDS[Kind.EXECUTIONS]
    #: Bound of each dead-letter stream.
    stream_maxlen_dead_letters: int = DEFAULT_BOUNDS[DEAD_LETTER_KIND]
    #: Entries older than this are trimmed once every consumer group has them (XTRIM
    #: MINID, never past the oldest entry a group still needs).
    stream_retention_s: float = 86_400.0
    #: How often a producing service trims its output streams.
    stream_trim_interval_s: float = 30.0
    #: Largest encoded message a producer adds; a larger one is refused.
    max_entry_bytes: int = DEFAULT_MAX_ENTRY_BYTES
    #: Symbol and active-replica leases: how long a lease lives unless renewed.
    lease_ttl_ms: int = 6_000
    #: Redis socket timeout (seconds); above the longest blocking read.
    redis_socket_timeout_s: float = REDIS_SOCKET_TIMEOUT_S
    #: Must be true for ``GS_MODE=live``: real money needs an explicit yes.
    live_trading_confirmed: bool = False
    #: Where orders go: the local simulator, the Binance spot testnet or Binance.
    venue: Literal["simulator", "binance-testnet", "binance"] = "simulator"
    #: The venue's REST base URL.
    venue_rest_url: str = "http://127.0.0.1:8900"
    #: The venue's websocket base URL (market streams and the WebSocket API).
    venue_ws_url: str = "ws://127.0.0.1:8900"

    def __post_init__(self) -> None:
        if not self.symbols:
            raise ValueError("GS_SYMBOLS: at least one symbol is required")
        if self.batch_size < 1:
            raise ValueError("GS_BATCH_SIZE: must be >= 1")
        if self.max_deliveries < 1:
            raise ValueError("GS_MAX_DELIVERIES: must be >= 1")
        for name in (
            "stream_maxlen_ticks",
            "stream_maxlen_candles",
            "stream_maxlen_signals",
            "stream_maxlen_intents",
            "stream_maxlen_orders",
            "stream_maxlen_executions",
            "stream_maxlen_dead_letters",
            "max_entry_bytes",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{env_name(name)}: must be >= 1")
        if self.stream_retention_s < 0:
            raise ValueError("GS_STREAM_RETENTION_S: must be >= 0")
        if self.stream_trim_interval_s <= 0:
            raise ValueError("GS_STREAM_TRIM_INTERVAL_S: must be > 0")
        if self.lease_ttl_ms < 300:
            raise ValueError("GS_LEASE_TTL_MS: must be >= 300")
        if self.redis_socket_timeout_s * 1000 <= self.block_ms + 1000:
            raise ValueError(
                "GS_REDIS_SOCKET_TIMEOUT_S: must exceed GS_BLOCK_MS by at least one second"
            )
        if self.replica and not all(c.isalnum() or c in "-_." for c in self.replica):
            raise ValueError("GS_REPLICA: letters, digits, '-', '_' and '.' only")
        if not 0 <= self.metrics_port <= 65535:
            raise ValueError("GS_METRICS_PORT: must be within 0..65535")
        if self.mode == "live" and not self.live_trading_confirmed:
            raise ValueError(
                "GS_MODE: live needs GS_LIVE_TRADING_CONFIRMED=true"
                " (live trading is never a default)"
            )
        if self.mode == "live" and self.venue != "binance":
            raise ValueError("GS_VENUE: mode live trades only on venue 'binance'")
        if self.venue == "binance" and self.mode not in ("live", "paper"):
            raise ValueError(f"GS_VENUE: venue 'binance' is real money; mode {self.mode} forbids")
        # The URLs must lead where the venue label says: a real-exchange URL under the
        # label 'simulator' would send orders to real money without any of the guards.
        for name in ("venue_rest_url", "venue_ws_url"):
            url = getattr(self, name)
            actual = venue_of_host(url)
            if actual is not None and actual != self.venue:
                raise ValueError(
                    f"{env_name(name)}: {url} is venue '{actual}', but GS_VENUE is '{self.venue}'"
                )
            if actual is None and self.venue != "simulator":
                raise ValueError(
                    f"{env_name(name)}: {url} is not a {self.venue} host (GS_VENUE={self.venue})"
                )

    def stream_bounds(self) -> dict[str, int]:
        """The hard bound (XADD MAXLEN ~) per stream kind, and for dead letters."""
        return {
            Kind.TICKS: self.stream_maxlen_ticks,
            Kind.CANDLES: self.stream_maxlen_candles,
            Kind.SIGNALS: self.stream_maxlen_signals,
            Kind.INTENTS: self.stream_maxlen_intents,
            Kind.ORDERS: self.stream_maxlen_orders,
            Kind.EXECUTIONS: self.stream_maxlen_executions,
            DEAD_LETTER_KIND: self.stream_maxlen_dead_letters,
        }

    def __repr__(self) -> str:
        parts = []
        for field in msgspec.structs.fields(self):
            value = getattr(self, field.name)
            if field.name in SECRET_FIELDS and isinstance(value, str):
                value = redact_url(value) if "://" in value else "***"
            parts.append(f"{field.name}={value!r}")
        return f"{type(self).__name__}({', '.join(parts)})"
