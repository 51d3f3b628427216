"""Backtests at scale: ``gridstream backtest`` against backtesting.py, same run.

1. ``sma-cross`` over ``--rows`` 1m bars (real BTCUSDT candles from data/klines tiled
   end to end, times shifted, written once as a CSV): the whole ``gridstream backtest``
   command as a user runs it (a new process: reading the file, the run, writing
   ``--out``), against backtesting.py's ``Backtest.run()`` alone on the same bars, its
   data already a DataFrame in memory (its own ``SmaCross``, long only, commission
   0.001). Target: gridstream at least 2x faster (ratio reference time / ours >= 2).
2. The grid over five pairs x ``--grid-rows`` 1m bars each (the five real files tiled),
   the whole command. Target: under 20 s for 5 x 525,600.

A command runs as Python runs it by default: with its modules' bytecode cached (in a
private ``PYTHONPYCACHEPREFIX``, filled by one untimed run on a small file first), as on
a developer's machine after the first run and in the images (``UV_COMPILE_BYTECODE=1``).
With ``PYTHONDONTWRITEBYTECODE=1`` and no cache (how some sandboxes run Python) every
start compiles ~650 modules, about a second here: the sma-cross figure is printed that
way too, beside the other (it is what this bench measured before 2026-12-04).

    uv run python bench/backtest.py [--rows 1000000] [--grid-rows 525600] [--skip-grid]
"""

from __future__ import annotations

import argparse
import gzip
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
KLINES = REPO / "data" / "klines"
#: Where the repo has no file of an interval (15m, 1h, ...): the shared data beside it.
SHARED_KLINES = REPO.parent / "shared" / "data" / "klines"
PAIRS = ("BTCUSDT", "ETHUSDT", "SOLUSDT", "XRPUSDT", "BNBUSDT")


def klines_file(symbol: str, interval: str) -> Path:
    """The real ``symbol`` candles of ``interval``: data/klines, else ../shared/data/klines."""
    for d in (KLINES, SHARED_KLINES):
        path = d / f"{symbol}-{interval}.csv.gz"
        if path.exists():
            return path
    raise FileNotFoundError(f"no {symbol}-{interval}.csv.gz in {KLINES} or {SHARED_KLINES}")


def tiled_csv(symbol: str, rows: int, dest: Path, interval: str = "1m") -> Path:
    """``rows`` ``interval`` candles of ``symbol``: its real file repeated, times shifted."""
    with gzip.open(klines_file(symbol, interval), "rt") as fh:
        header = next(fh)
        lines = [line.rstrip("\n").split(",") for line in fh]
    first = int(lines[0][0])
    step = int(lines[0][6]) - first + 1  # close time is open time + interval - 1 ms
    span = int(lines[-1][0]) - first + step
    out = dest / f"{symbol}-{interval}.csv"
    with out.open("w") as fh:
        fh.write(header)
        n = 0
        rep = 0
        while n < rows:
            for f in lines:
                if n >= rows:
                    break
                t = int(f[0]) + rep * span
                fh.write(f"{t},{f[1]},{f[2]},{f[3]},{f[4]},{f[5]},{t + step - 1},,,,\n")
                n += 1
            rep += 1
    return out


def reference_seconds(path: Path) -> tuple[float, int]:
    from backtesting import Backtest, Strategy
    from backtesting.lib import crossover

    df = pd.read_csv(path, usecols=["open_time_ms", "open", "high", "low", "close", "volume"])
    df.index = pd.to_datetime(df.pop("open_time_ms"), unit="ms")
    df.columns = ["Open", "High", "Low", "Close", "Volume"]

    def sma(values: np.ndarray, n: int) -> np.ndarray:
        return pd.Series(values).rolling(n).mean().to_numpy()

    class LongSmaCross(Strategy):
        def init(self) -> None:
            self.fast = self.I(sma, self.data.Close, 10)
            self.slow = self.I(sma, self.data.Close, 30)

        def next(self) -> None:
            if crossover(self.fast, self.slow) and not self.position:
                self.buy(size=1)
            elif crossover(self.slow, self.fast) and self.position:
                self.position.close()

    bt = Backtest(df, LongSmaCross, cash=10_000_000, commission=0.001, finalize_trades=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        stats = bt.run()
        took = time.perf_counter() - t0
    return took, int(stats["# Trades"])


def command_env(pycache: Path, *, cached: bool) -> dict[str, str]:
    """The environment of a measured command: no ``GS_*`` setting; its bytecode cached in
    ``pycache`` (``cached``), else found nowhere and compiled at every start."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GS_")}
    env["PYTHONPYCACHEPREFIX"] = str(pycache)
    if cached:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
    else:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def gridstream_seconds(
    strategy: str, files: list[Path], out: Path, *sets: str, env: dict[str, str]
) -> float:
    cmd = [sys.executable, "-m", "gridstream.cli", "backtest", "--strategy", strategy]
    cmd += ["--candles", *map(str, files), "--out", str(out), "--cash", "10000000"]
    for s in sets:
        cmd += ["--set", s]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def load() -> str:
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--grid-rows", type=int, default=525_600)
    ap.add_argument("--skip-grid", action="store_true")
    args = ap.parse_args()
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores, {load()}")
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        cached = command_env(d / "pycache", cached=True)
        compiling = command_env(d / "no-pycache", cached=False)
        small = d / "small"
        small.mkdir()
        # untimed: fills the bytecode cache (and runs every path the timed runs take)
        gridstream_seconds("sma-cross", [tiled_csv("BTCUSDT", 5000, small)], d / "warm", env=cached)
        btc = tiled_csv("BTCUSDT", args.rows, d)
        ref, trades = reference_seconds(btc)
        ours = gridstream_seconds("sma-cross", [btc], d / "sma", "qty=1", env=cached)
        cold = gridstream_seconds("sma-cross", [btc], d / "sma-cold", "qty=1", env=compiling)
        print(
            f"reference  backtesting.py run(), {args.rows:,} bars: {ref:8.2f} s  ({args.rows / ref:,.0f} bars/s, {trades} trades)"
        )
        print(
            f"gridstream backtest sma-cross, whole command:   {ours:8.2f} s  ({args.rows / ours:,.0f} bars/s)"
        )
        print(
            f"  the same, compiling every module at start:   {cold:8.2f} s  (ratio {ref / cold:.2f})"
        )
        ratio = ref / ours
        print(
            f"ratio reference/gridstream: {ratio:.2f}   target >= 2 (aim 10): {'MET' if ratio >= 2 else 'NOT MET'}"
        )
        if not args.skip_grid:
            files = [tiled_csv(p, args.grid_rows, d) for p in PAIRS]
            took = gridstream_seconds("grid", files, d / "grid", env=cached)
            total = args.grid_rows * len(PAIRS)
            print(
                f"gridstream backtest grid, {len(PAIRS)} pairs x {args.grid_rows:,} bars: {took:8.2f} s  ({total / took:,.0f} bars/s)"
            )
            print(f"target < 20 s (aim 5): {'MET' if took < 20 else 'NOT MET'}")
    print(load())


if __name__ == "__main__":
    main()
