"""Simulator settings, read from ``GS_SIM_*`` environment variables.

Parsed once at start into a frozen :class:`SimSettings`; an invalid value raises
:class:`SettingsError` naming the variable (``main`` turns it into a clean exit).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Final

import msgspec

from gridstream.common.settings import SettingsError as CommonSettingsError
from gridstream.common.settings import check_environment

KNOWN_SYMBOLS = ("BTCUSDT", "ETHUSDT", "BNBUSDT", "SOLUSDT", "XRPUSDT")
FAULT_KINDS = ("drop", "drop-every", "silence", "repeat")


class SettingsError(ValueError):
    """An environment variable holds an invalid value."""

    def __init__(self, var: str, value: str, reason: str) -> None:
        super().__init__(f"invalid setting {var}={value!r}: {reason}" if var else reason)
        self.var = var


def default_data_dir() -> Path:
    """The repository's ``data/klines``, found by walking up from this file."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        cand = parent / "data" / "klines"
        if cand.is_dir():
            return cand
    return Path("data/klines")


class FaultSpec(msgspec.Struct, frozen=True):
    """One scheduled websocket fault (``GS_SIM_FAULTS`` item ``KIND@MINUTE[:ARG]``).

    ``minute`` is the replay-minute offset from the window start at which it fires (for
    ``drop-every`` it is the period N). ``arg``: seconds of silence, or frames to repeat.
    """

    kind: str
    minute: int
    arg: float = 0.0


class FilterSpec(msgspec.Struct, frozen=True):
    """``GS_SIM_FILTERS`` override for one symbol: tick size, step size, min notional."""

    tick: Decimal
    step: Decimal
    min_notional: Decimal | None = None


class SimSettings(msgspec.Struct, frozen=True, kw_only=True):
    host: str = "127.0.0.1"
    port: int = 8900
    data_dir: str = ""
    symbols: tuple[str, ...] = ("BTCUSDT", "ETHUSDT")
    start_ms: int | None = None
    history_hours: float = 0.0
    hours: float = 24.0
    speed: float = 1.0
    balances: dict[str, Decimal] = msgspec.field(default_factory=lambda: {"USDT": Decimal(700)})
    api_key: str = "sim-key"
    api_secret: str = "sim-secret"
    trades_per_candle: int = 8
    wait_for_clients: bool = True
    #: Replay in lockstep with a driver: pause at every barrier until ``POST /sim/resume``.
    lockstep: bool = False
    maker_fee: Decimal = Decimal("0.001")
    taker_fee: Decimal = Decimal("0.001")
    # replay any candle/trade file: SYMBOL -> path (GS_SIM_FILES)
    files: dict[str, str] = msgspec.field(default_factory=dict)
    filters: dict[str, FilterSpec] = msgspec.field(default_factory=dict)
    # request weight per IP per window (wall clock), 429 then 418 bans
    weight_limit: int = 6000
    weight_window_s: float = 60.0
    ban_seconds: float = 120.0
    faults: tuple[FaultSpec, ...] = ()
    rest_forming_kline: bool = False

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir) if self.data_dir else default_data_dir()


#: Every variable the simulator reads: (name, SimSettings field, what it sets). The
#: settings reference (docs/settings.md) is generated from this.
SIM_VARIABLES: Final[tuple[tuple[str, str, str], ...]] = (
    ("GS_SIM_HOST", "host", "address the REST and websocket servers listen on"),
    ("GS_SIM_PORT", "port", "port of the REST and websocket servers (0: any free port)"),
    ("GS_SIM_DATA_DIR", "data_dir", "folder of the candle files replayed (default data/klines)"),
    ("GS_SIM_FILES", "files", "SYMBOL=PATH,... replay these candle or trade files"),
    ("GS_SIM_FILTERS", "filters", "SYMBOL=tick/step[/minNotional],... exchange filters"),
    ("GS_SIM_SYMBOLS", "symbols", "symbols served, comma separated"),
    ("GS_SIM_START", "start_ms", "replay start: epoch ms or ISO time (default: data start)"),
    ("GS_SIM_HISTORY_HOURS", "history_hours", "hours of history served before the start"),
    ("GS_SIM_HOURS", "hours", "hours replayed"),
    ("GS_SIM_SPEED", "speed", "replay speed (1: real time; 0: as fast as possible)"),
    ("GS_SIM_BALANCES", "balances", "ASSET=AMOUNT,... starting balances"),
    ("GS_SIM_API_KEY", "api_key", "API key the simulator accepts (secret)"),
    ("GS_SIM_API_SECRET", "api_secret", "API secret signatures are checked with (secret)"),
    ("GS_SIM_TRADES_PER_CANDLE", "trades_per_candle", "synthetic trades per 1m candle"),
    ("GS_SIM_WAIT_FOR_CLIENTS", "wait_for_clients", "hold the replay until a client connects"),
    (
        "GS_SIM_LOCKSTEP",
        "lockstep",
        "pause at every barrier (start, trades that filled, each minute's closes)"
        " until POST /sim/resume",
    ),
    ("GS_SIM_MAKER_FEE", "maker_fee", "maker commission, a fraction"),
    ("GS_SIM_TAKER_FEE", "taker_fee", "taker commission, a fraction"),
    ("GS_SIM_WEIGHT_LIMIT", "weight_limit", "REST request weight per IP per window"),
    ("GS_SIM_WEIGHT_WINDOW_S", "weight_window_s", "the weight window, seconds"),
    ("GS_SIM_BAN_SECONDS", "ban_seconds", "how long an IP over the limit is banned (418)"),
    ("GS_SIM_FAULTS", "faults", "KIND@MINUTE[:ARG];... websocket faults to inject"),
    ("GS_SIM_REST_FORMING_KLINE", "rest_forming_kline", "REST klines include the forming one"),
)


def _parse_time(var: str, raw: str) -> int:
    s = raw.strip()
    if s.isdigit():
        return int(s)
    try:
        dt = datetime.fromisoformat(s.replace("Z", "+00:00"))
    except ValueError as exc:
        raise SettingsError(var, raw, "expected epoch ms or an ISO date/time") from exc
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp() * 1000)


def _parse_bool(var: str, raw: str) -> bool:
    v = raw.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise SettingsError(var, raw, "expected true/false")


def _parse_decimal(var: str, raw: str) -> Decimal:
    try:
        d = Decimal(raw.strip())
    except InvalidOperation as exc:
        raise SettingsError(var, raw, "expected a decimal number") from exc
    if not d.is_finite() or d < 0:
        raise SettingsError(var, raw, "expected a finite, non-negative number")
    return d


def _parse_float(var: str, raw: str, *, positive: bool) -> float:
    try:
        f = float(raw)
    except ValueError as exc:
        raise SettingsError(var, raw, "expected a number") from exc
    if f != f or f in (float("inf"), float("-inf")) or f < 0 or (positive and f == 0):
        raise SettingsError(var, raw, "expected a positive number" if positive else ">= 0")
    return f


def _parse_int(var: str, raw: str, lo: int, hi: int) -> int:
    try:
        i = int(raw)
    except ValueError as exc:
        raise SettingsError(var, raw, "expected an integer") from exc
    if not lo <= i <= hi:
        raise SettingsError(var, raw, f"expected {lo}..{hi}")
    return i


def _parse_balances(var: str, raw: str) -> dict[str, Decimal]:
    out: dict[str, Decimal] = {}
    for part in raw.split(","):
        part = part.strip()
        if not part:
            continue
        asset, sep, amount = part.partition("=")
        if not sep or not asset.strip().isalnum():
            raise SettingsError(var, raw, "expected ASSET=AMOUNT[,ASSET=AMOUNT...]")
        out[asset.strip().upper()] = _parse_decimal(var, amount)
    return out


def _parse_files(var: str, raw: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in raw.split(","):
        part = part.strip()
        if not part:
            continue
        sym, sep, path = part.partition("=")
        sym = sym.strip().upper()
        if not sep or not sym.isalnum() or not path.strip():
            raise SettingsError(var, raw, "expected SYMBOL=path[,SYMBOL=path...]")
        if not Path(path.strip()).is_file():
            raise SettingsError(var, raw, f"no such file: {path.strip()}")
        out[sym] = path.strip()
    if not out:
        raise SettingsError(var, raw, "expected SYMBOL=path[,SYMBOL=path...]")
    return out


def _parse_filters(var: str, raw: str) -> dict[str, FilterSpec]:
    """``SYMBOL=tick/step[/minNotional],...``, e.g. ``XRPETH=0.00000001/1/0.001``."""
    out: dict[str, FilterSpec] = {}
    for part in raw.split(","):
        part = part.strip()
        if not part:
            continue
        sym, sep, rest = part.partition("=")
        vals = rest.split("/")
        if not sep or not sym.strip().isalnum() or len(vals) not in (2, 3):
            raise SettingsError(var, raw, "expected SYMBOL=tick/step[/minNotional],...")
        nums = [_parse_decimal(var, v) for v in vals]
        if nums[0] <= 0 or nums[1] <= 0:
            raise SettingsError(var, raw, "tick and step must be > 0")
        out[sym.strip().upper()] = FilterSpec(nums[0], nums[1], nums[2] if len(nums) == 3 else None)
    return out


def parse_faults(var: str, raw: str) -> tuple[FaultSpec, ...]:
    """``KIND@MINUTE[:ARG];...`` (see :class:`FaultSpec`)."""
    out: list[FaultSpec] = []
    for item in raw.split(";"):
        item = item.strip()
        if not item:
            continue
        kind, sep, rest = item.partition("@")
        minute_s, _, arg_s = rest.partition(":")
        kind = kind.strip().lower()
        if not sep or kind not in FAULT_KINDS:
            raise SettingsError(
                var, raw, f"{item!r}: expected KIND@MINUTE[:ARG], KIND in {FAULT_KINDS}"
            )
        try:
            minute = int(minute_s)
            arg = float(arg_s) if arg_s.strip() else 0.0
        except ValueError as exc:
            raise SettingsError(
                var, raw, f"{item!r}: MINUTE must be an integer, ARG a number"
            ) from exc
        if minute < 0 or arg < 0 or arg != arg or arg == float("inf"):
            raise SettingsError(var, raw, f"{item!r}: MINUTE and ARG must be >= 0")
        if kind == "drop-every" and minute == 0:
            raise SettingsError(var, raw, f"{item!r}: drop-every@N needs N > 0")
        if kind in ("silence", "repeat") and arg <= 0:
            raise SettingsError(var, raw, f"{item!r}: {kind} needs a positive ARG")
        if kind == "repeat" and arg != int(arg):
            raise SettingsError(var, raw, f"{item!r}: repeat ARG is a frame count")
        if kind in ("drop", "drop-every") and arg_s.strip():
            raise SettingsError(var, raw, f"{item!r}: {kind} takes no ARG")
        out.append(FaultSpec(kind, minute, arg))
    return tuple(out)


def load_sim_settings(env: Mapping[str, str] | None = None) -> SimSettings:
    """Build :class:`SimSettings` from ``env`` (default: ``os.environ``)."""
    e = os.environ if env is None else env
    try:
        check_environment(e)
    except CommonSettingsError as exc:
        raise SettingsError("", "", str(exc)) from None
    kw: dict[str, object] = {}
    if (v := e.get("GS_SIM_HOST")) is not None:
        if not v.strip():
            raise SettingsError("GS_SIM_HOST", v, "must not be empty")
        kw["host"] = v.strip()
    if (v := e.get("GS_SIM_PORT")) is not None:
        kw["port"] = _parse_int("GS_SIM_PORT", v, 0, 65535)
    if (v := e.get("GS_SIM_DATA_DIR")) is not None and v.strip():
        if not Path(v).is_dir():
            raise SettingsError("GS_SIM_DATA_DIR", v, "not a directory")
        kw["data_dir"] = v
    files: dict[str, str] = {}
    if (v := e.get("GS_SIM_FILES")) is not None and v.strip():
        files = kw["files"] = _parse_files("GS_SIM_FILES", v)
    if (v := e.get("GS_SIM_FILTERS")) is not None and v.strip():
        kw["filters"] = _parse_filters("GS_SIM_FILTERS", v)
    if (v := e.get("GS_SIM_SYMBOLS")) is not None:
        syms = tuple(s.strip().upper() for s in v.split(",") if s.strip())
        bad = [s for s in syms if s not in KNOWN_SYMBOLS and s not in files]
        if not syms or bad:
            raise SettingsError(
                "GS_SIM_SYMBOLS", v, f"symbols must be among {KNOWN_SYMBOLS} or in GS_SIM_FILES"
            )
        kw["symbols"] = tuple(dict.fromkeys(syms + tuple(files)))
    elif files:
        kw["symbols"] = tuple(files)
    if (v := e.get("GS_SIM_START")) is not None and v.strip():
        kw["start_ms"] = _parse_time("GS_SIM_START", v)
    if (v := e.get("GS_SIM_HISTORY_HOURS")) is not None:
        kw["history_hours"] = _parse_float("GS_SIM_HISTORY_HOURS", v, positive=False)
    if (v := e.get("GS_SIM_HOURS")) is not None:
        kw["hours"] = _parse_float("GS_SIM_HOURS", v, positive=True)
    if (v := e.get("GS_SIM_SPEED")) is not None:
        kw["speed"] = _parse_float("GS_SIM_SPEED", v, positive=False)
    if (v := e.get("GS_SIM_BALANCES")) is not None:
        kw["balances"] = _parse_balances("GS_SIM_BALANCES", v)
    if (v := e.get("GS_SIM_API_KEY")) is not None:
        if not v:
            raise SettingsError("GS_SIM_API_KEY", v, "must not be empty")
        kw["api_key"] = v
    if (v := e.get("GS_SIM_API_SECRET")) is not None:
        if not v:
            raise SettingsError("GS_SIM_API_SECRET", v, "must not be empty")
        kw["api_secret"] = v
    if (v := e.get("GS_SIM_TRADES_PER_CANDLE")) is not None:
        kw["trades_per_candle"] = _parse_int("GS_SIM_TRADES_PER_CANDLE", v, 4, 1000)
    if (v := e.get("GS_SIM_WAIT_FOR_CLIENTS")) is not None:
        kw["wait_for_clients"] = _parse_bool("GS_SIM_WAIT_FOR_CLIENTS", v)
    if (v := e.get("GS_SIM_LOCKSTEP")) is not None:
        kw["lockstep"] = _parse_bool("GS_SIM_LOCKSTEP", v)
    if (v := e.get("GS_SIM_MAKER_FEE")) is not None:
        kw["maker_fee"] = _parse_decimal("GS_SIM_MAKER_FEE", v)
    if (v := e.get("GS_SIM_TAKER_FEE")) is not None:
        kw["taker_fee"] = _parse_decimal("GS_SIM_TAKER_FEE", v)
    if (v := e.get("GS_SIM_WEIGHT_LIMIT")) is not None:
        kw["weight_limit"] = _parse_int("GS_SIM_WEIGHT_LIMIT", v, 1, 10**9)
    if (v := e.get("GS_SIM_WEIGHT_WINDOW_S")) is not None:
        kw["weight_window_s"] = _parse_float("GS_SIM_WEIGHT_WINDOW_S", v, positive=True)
    if (v := e.get("GS_SIM_BAN_SECONDS")) is not None:
        kw["ban_seconds"] = _parse_float("GS_SIM_BAN_SECONDS", v, positive=True)
    if (v := e.get("GS_SIM_FAULTS")) is not None and v.strip():
        kw["faults"] = parse_faults("GS_SIM_FAULTS", v)
    if (v := e.get("GS_SIM_REST_FORMING_KLINE")) is not None:
        kw["rest_forming_kline"] = _parse_bool("GS_SIM_REST_FORMING_KLINE", v)
    return SimSettings(**kw)  # type: ignore[arg-type]
