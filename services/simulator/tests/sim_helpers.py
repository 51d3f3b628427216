"""Shared test helpers: settings, signing, payload shapes (imported via conftest's sys.path)."""

from __future__ import annotations

import gzip
import hashlib
import hmac
import json
import re
import time
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from gridstream.simulator.settings import SimSettings, default_data_dir

FIXTURES = Path(__file__).parent / "fixtures"
KEY, SECRET = "test-key", "test-secret"
DAY_MS = 86_400_000
DEC_RE = re.compile(r"^-?\d+(\.\d+)?$")


def first_open() -> int:
    with gzip.open(default_data_dir() / "BTCUSDT-1m.csv.gz", "rt") as fh:
        fh.readline()
        return int(fh.readline().split(",")[0])


# Replay window starts one day into the files, so REST has a day of history.
WINDOW_START = first_open() + DAY_MS


def read_csv(symbol: str, n: int, start: int = 0) -> list[list[str]]:
    rows: list[list[str]] = []
    with gzip.open(default_data_dir() / f"{symbol}-1m.csv.gz", "rt") as fh:
        fh.readline()
        for line in fh:
            f = line.strip().split(",")
            if int(f[0]) < start:
                continue
            rows.append(f)
            if len(rows) >= n:
                break
    return rows


def fixture(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


def settings(**kw: Any) -> SimSettings:
    base: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "symbols": ("BTCUSDT", "ETHUSDT"),
        "start_ms": WINDOW_START,
        "hours": 1.0,
        "speed": 0.0,
        "api_key": KEY,
        "api_secret": SECRET,
        "wait_for_clients": True,
        "balances": {"USDT": Decimal(700)},
    }
    base.update(kw)
    return SimSettings(**base)


def sign(params: dict[str, Any], secret: str = SECRET, ts: int | None = None) -> str:
    p = dict(params)
    p.setdefault("timestamp", ts if ts is not None else int(time.time() * 1000))
    q = urlencode(p)
    sig = hmac.new(secret.encode(), q.encode(), hashlib.sha256).hexdigest()
    return f"{q}&signature={sig}"


def jtype(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, int):
        return "int"
    if isinstance(v, float):
        return "float"
    if isinstance(v, str):
        return "decimal-string" if DEC_RE.match(v) else "string"
    if isinstance(v, list):
        return "list"
    return "dict"


def assert_same_shape(
    actual: Any, expected: Any, path: str = "$", optional: frozenset[str] = frozenset()
) -> None:
    """Same keys and the same JSON type per field (decimal strings stay decimal strings)."""
    ta, te = jtype(actual), jtype(expected)
    if te == "null" or ta == "null":
        return  # nullable in the docs (e.g. executionReport N)
    assert ta == te, f"{path}: {ta} ({actual!r}) != {te} ({expected!r})"
    if te == "dict":
        ka, ke = set(actual) - optional, set(expected) - optional
        assert ka == ke, f"{path}: extra {sorted(ka - ke)} missing {sorted(ke - ka)}"
        for k in ke:
            assert_same_shape(actual[k], expected[k], f"{path}.{k}", optional)
    elif te == "list" and expected and actual:
        for i, item in enumerate(actual):
            assert_same_shape(item, expected[min(i, len(expected) - 1)], f"{path}[{i}]", optional)
