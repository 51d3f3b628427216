"""Incremental signal updates for 500 symbols: CPU per 1m round, vs recomputing windows.

What: one ``SignalEngine`` as the service runs it (1m signals plus 5m/15m/1h candles and
signals built from the 1m candles), 500 symbols (the five real pairs of data/klines, each
replayed for 100 symbols). The engine is warmed with ``--warm`` rounds first (untimed);
then ``--rounds`` rounds, each one closed 1m candle for every symbol through
``engine.on_candle`` (Decimal -> float, every indicator, regime, ``Signal`` built), timed
with ``time.process_time``. Reference, same run: the naive design, one TA-Lib call per
indicator over the last ``warmup`` candles of each symbol, per candle (same 500 symbols,
``--ref-rounds`` rounds). Target: one round of 500 symbols under 50 ms of CPU.

    uv run python bench/signals_incremental.py [--symbols 500] [--rounds 200]
"""

from __future__ import annotations

import argparse
import csv
import gzip
import os
import platform
import time
from decimal import Decimal
from pathlib import Path

import numpy as np
import talib

from gridstream.common.messages import Candle
from gridstream.core.signals.engine import SignalEngine, SignalParams

DATA = Path(__file__).resolve().parents[1] / "data" / "klines"
PAIRS = ("BTCUSDT", "ETHUSDT", "BNBUSDT", "SOLUSDT", "XRPUSDT")


def rows(pair: str, n: int) -> list[dict[str, str]]:
    with gzip.open(DATA / f"{pair}-1m.csv.gz", "rt") as f:
        return [r for _, r in zip(range(n), csv.DictReader(f), strict=False)]


def candle(symbol: str, r: dict[str, str]) -> Candle:
    close_time = int(r["close_time_ms"])
    return Candle(
        id=f"candle:{symbol}:1m:{r['open_time_ms']}",
        ts_event=(close_time + 1) * 1_000_000,
        ts_init=(close_time + 1) * 1_000_000,
        symbol=symbol,
        interval="1m",
        open_time=int(r["open_time_ms"]),
        close_time=close_time,
        open=Decimal(r["open"]),
        high=Decimal(r["high"]),
        low=Decimal(r["low"]),
        close=Decimal(r["close"]),
        volume=Decimal(r["volume"]),
    )


def talib_window(h: np.ndarray, lo: np.ndarray, c: np.ndarray, p: SignalParams) -> None:
    talib.SMA(c, p.sma_period)
    talib.EMA(c, p.ema_period)
    talib.RSI(c, p.rsi_period)
    talib.ATR(h, lo, c, p.atr_period)
    talib.BBANDS(c, p.bb_period, p.bb_k, p.bb_k, 0)
    talib.PLUS_DI(h, lo, c, p.adx_period)
    talib.MINUS_DI(h, lo, c, p.adx_period)
    talib.ADX(h, lo, c, p.adx_period)
    talib.MAX(h, p.donchian_period)
    talib.MIN(lo, p.donchian_period)
    talib.STDDEV(np.diff(np.log(c)), p.vol_window, 1.0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--symbols", type=int, default=500)
    ap.add_argument("--warm", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--ref-rounds", type=int, default=20)
    args = ap.parse_args()
    p = SignalParams()
    total = args.warm + args.rounds
    src = {pair: rows(pair, total) for pair in PAIRS}
    symbols = [f"{PAIRS[i % 5][:-4]}{i:03d}USDT" for i in range(args.symbols)]
    series = {s: [candle(s, r) for r in src[PAIRS[i % 5]]] for i, s in enumerate(symbols)}
    engine = SignalEngine(p, higher=("5m", "15m", "1h"))
    for t in range(args.warm):
        for s in symbols:
            engine.on_candle(series[s][t])
    per_round: list[float] = []
    emitted = 0
    for t in range(args.warm, total):
        start = time.process_time()
        for s in symbols:
            emitted += len(engine.on_candle(series[s][t]))
        per_round.append(time.process_time() - start)
    assert emitted >= args.rounds * args.symbols  # every 1m candle gave its signal

    window = p.warmup
    arrays = {
        s: tuple(
            np.array([float(getattr(c, f)) for c in series[s]]) for f in ("high", "low", "close")
        )
        for s in symbols
    }
    ref_round: list[float] = []
    for t in range(args.warm, args.warm + args.ref_rounds):
        start = time.process_time()
        for s in symbols:
            h, lo, c = arrays[s]
            talib_window(
                h[t - window + 1 : t + 1], lo[t - window + 1 : t + 1], c[t - window + 1 : t + 1], p
            )
        ref_round.append(time.process_time() - start)

    ms = np.array(per_round) * 1000
    ref_ms = float(np.mean(ref_round) * 1000)
    mean = float(ms.mean())
    print(
        f"python {platform.python_version()}, {os.cpu_count()} cores; {args.symbols} symbols,"
        f" {args.rounds} timed rounds after {args.warm} warm-up rounds; 1m + 5m/15m/1h"
    )
    print(
        f"reference  TA-Lib recompute over the last {window} candles per symbol: {ref_ms:8.1f} ms CPU per round"
    )
    print(
        f"gridstream SignalEngine.on_candle, incremental:           {mean:8.1f} ms CPU per round"
        f" (median {np.median(ms):.1f}, p99 {np.percentile(ms, 99):.1f}, max {ms.max():.1f})"
    )
    print(
        f"  = {args.symbols / (mean / 1000):,.0f} updates/s, {mean / args.symbols * 1000:.1f} us per symbol update"
    )
    print(
        f"ratio gridstream/reference: {mean / ref_ms:.2f}   target < 50 ms: {'MET' if mean < 50 else 'MISSED'}"
    )


if __name__ == "__main__":
    main()
