"""Test data for the ingestor: real candles from data/klines as Binance frames and rows."""

from __future__ import annotations

import csv
import gzip
import json
from decimal import Decimal
from functools import cache
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[3]
KLINES = REPO / "data" / "klines"
FIXTURES = Path(__file__).parent / "fixtures"


@cache
def real_candles(symbol: str = "BTCUSDT", n: int = 40) -> tuple[dict[str, str], ...]:
    """The first ``n`` real 1m candles of ``symbol`` (CSV rows as dicts of strings)."""
    out: list[dict[str, str]] = []
    with gzip.open(KLINES / f"{symbol}-1m.csv.gz", "rt") as fh:
        for row in csv.DictReader(fh):
            out.append(row)
            if len(out) == n:
                break
    return tuple(out)


def fixture_bytes(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def kline_frame(
    row: dict[str, str], symbol: str = "BTCUSDT", *, closed: bool = True, interval: str = "1m"
) -> bytes:
    """A combined-stream kline frame, exactly as Binance sends it, for one real candle."""
    close_time = int(row["close_time_ms"])
    data = {
        "e": "kline",
        "E": close_time + 1 if closed else close_time - 30_000,
        "s": symbol,
        "k": {
            "t": int(row["open_time_ms"]),
            "T": close_time,
            "s": symbol,
            "i": interval,
            "f": 100,
            "L": 200,
            "o": row["open"],
            "c": row["close"],
            "h": row["high"],
            "l": row["low"],
            "v": row["volume"],
            "n": int(row["trades"] or 0),
            "x": closed,
            "q": row["quote_volume"] or "0",
            "V": "0",
            "Q": "0",
            "B": "0",
        },
    }
    return json.dumps({"stream": f"{symbol.lower()}@kline_{interval}", "data": data}).encode()


def rest_row(row: dict[str, str]) -> list[Any]:
    """The same candle as a ``GET /api/v3/klines`` row (12 fields)."""
    return [
        int(row["open_time_ms"]),
        row["open"],
        row["high"],
        row["low"],
        row["close"],
        row["volume"],
        int(row["close_time_ms"]),
        row["quote_volume"] or "0",
        int(row["trades"] or 0),
        "0",
        "0",
        "0",
    ]


def trade_frame(
    symbol: str, trade_id: int, price: str, qty: str, time_ms: int, buyer_maker: bool
) -> bytes:
    """A combined-stream trade frame."""
    data = {
        "e": "trade",
        "E": time_ms + 1,
        "s": symbol,
        "t": trade_id,
        "p": price,
        "q": qty,
        "T": time_ms,
        "m": buyer_maker,
        "M": True,
    }
    return json.dumps({"stream": f"{symbol.lower()}@trade", "data": data}).encode()


def trades_in(
    row: dict[str, str], first_id: int, n: int = 3, symbol: str = "BTCUSDT"
) -> list[bytes]:
    """``n`` trades inside one real candle, at its open, close and in between."""
    t0 = int(row["open_time_ms"])
    prices = [row["open"], row["high"], row["low"], row["close"]]
    return [
        trade_frame(
            symbol,
            first_id + i,
            prices[i % 4],
            "0.00123",
            t0 + 1000 * (i + 1),
            buyer_maker=i % 2 == 0,
        )
        for i in range(n)
    ]


def expected(row: dict[str, str]) -> dict[str, Any]:
    """The candle fields a row must become."""
    return {
        "open_time": int(row["open_time_ms"]),
        "close_time": int(row["close_time_ms"]),
        "open": Decimal(row["open"]),
        "high": Decimal(row["high"]),
        "low": Decimal(row["low"]),
        "close": Decimal(row["close"]),
        "volume": Decimal(row["volume"]),
    }
