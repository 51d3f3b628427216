"""``gridstream sweep`` from one core to two: the same grid of settings, 1 and 2 workers.

The grid (the product's strategy) over one pair-year of 15m candles (``--bars`` 35,040
real BTCUSDT candles, the file tiled if it is shorter, written once as a CSV): a sweep
of ``--settings`` combinations (64: ``levels`` 1..8 x ``atr_mult`` 1.0..4.5), run as a
user runs it (a new ``gridstream sweep`` process, ``--out`` a CSV of every figure), once
with ``--jobs 1`` (the reference: every run in the one process) and once with
``--jobs 2`` (a spawned pool of two, each loading the candles once). Prints both wall
times, the speed-up (1-worker time / 2-worker time; perfect scaling is 2.00), runs per
second and the CPU each command used with its workers (CPU / wall: how many cores it
really had, which shows a loaded machine), and fails unless both runs give the same
figures for every setting.

    uv run python bench/sweep.py [--bars 35040] [--settings 64] [--symbol BTCUSDT]
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from backtest import tiled_csv


def grid_axes(settings: int) -> list[str]:
    """``--grid`` arguments of ``settings`` combinations: levels x atr_mult, near square."""
    rows = max(d for d in range(1, math.isqrt(settings) + 1) if settings % d == 0)
    cols = settings // rows
    levels = ",".join(str(n) for n in range(1, cols + 1))
    atr_mult = ",".join(str(1 + n / 2) for n in range(rows))
    return ["--grid", f"levels={levels}", "--grid", f"atr_mult={atr_mult}"]


def cpu_seconds() -> float:
    """User + system CPU of the finished child processes (and theirs: the pool's workers)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def sweep(candles: Path, axes: list[str], jobs: int, out: Path) -> tuple[float, float, str]:
    """Wall and CPU seconds of the whole ``gridstream sweep`` command, and its table."""
    cmd = [sys.executable, "-m", "gridstream.cli", "sweep", "--strategy", "grid"]
    cmd += ["--candles", str(candles), *axes, "--jobs", str(jobs), "--out", str(out)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("GS_")}
    c0, t0 = cpu_seconds(), time.perf_counter()
    run = subprocess.run(cmd, check=True, env=env, capture_output=True, text=True)
    return time.perf_counter() - t0, cpu_seconds() - c0, run.stdout


def results(path: Path) -> dict[tuple[str, str], dict[str, str]]:
    """Every figure of every run, by its (levels, atr_mult)."""
    with path.open() as fh:
        return {(r["levels"], r["atr_mult"]): r for r in csv.DictReader(fh)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bars", type=int, default=35_040, help="15m candles (35,040: a year)")
    ap.add_argument("--settings", type=int, default=64, help="combinations to sweep")
    ap.add_argument("--symbol", default="BTCUSDT")
    args = ap.parse_args()
    if args.settings < 1 or args.bars < 1:
        ap.error("--settings and --bars: at least 1")
    axes = grid_axes(args.settings)
    load = os.getloadavg()[0]
    print(
        f"python {sys.version.split()[0]}, {os.cpu_count()} cores, load {load:.2f}; "
        f"grid, {args.settings} settings ({axes[1]} x {axes[3]}) over {args.bars:,} 15m bars of {args.symbol}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        candles = tiled_csv(args.symbol, args.bars, d, "15m")
        one, cpu_one, table_one = sweep(candles, axes, 1, d / "one.csv")
        two, cpu_two, table_two = sweep(candles, axes, 2, d / "two.csv")
        rows_one, rows_two = results(d / "one.csv"), results(d / "two.csv")
    n = args.settings
    print(
        f"reference  gridstream sweep --jobs 1:  {one:8.2f} s  ({n / one:6.3f} settings/s; CPU {cpu_one:7.1f} s, {cpu_one / one:.2f} cores busy)"
    )
    print(
        f"gridstream sweep --jobs 2:             {two:8.2f} s  ({n / two:6.3f} settings/s; CPU {cpu_two:7.1f} s, {cpu_two / two:.2f} cores busy)"
    )
    print(f"speed-up 1 worker / 2 workers: {one / two:.2f}   (perfect scaling: 2.00)")
    errors = [k for k, r in rows_one.items() if r.get("error")]
    same = len(rows_one) == n and rows_one == rows_two and table_one == table_two
    print(
        f"results: {len(rows_one)} settings, {len(errors)} errors; "
        f"1-worker and 2-worker tables {'IDENTICAL' if same else 'DIFFER'}; "
        f"load at the end {os.getloadavg()[0]:.2f}"
    )
    if not same or errors:
        for k in sorted(set(rows_one) | set(rows_two)):
            if rows_one.get(k) != rows_two.get(k):
                print(f"  {k}: 1 worker {rows_one.get(k)}\n  {k}: 2 workers {rows_two.get(k)}")
        sys.exit(1)


if __name__ == "__main__":
    main()
