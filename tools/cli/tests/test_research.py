"""``gridstream sweep`` and ``walkforward`` over real candles, as a user runs them."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GS_")}
    return subprocess.run(
        [sys.executable, "-m", "gridstream.cli", *args],
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
        env=env,
    )


def test_sweep_ranks_every_combination_with_the_backtests_own_figures(tmp_path, slice_file):
    f = str(slice_file("ETHUSDT", 3))
    out = tmp_path / "sweep.csv"
    run = cli(
        "sweep",
        "--strategy",
        "sma-cross",
        "--candles",
        f,
        "--grid",
        "fast=5,10",
        "--grid",
        "slow=20,40",
        "--set",
        "qty=0.05",
        "--jobs",
        "2",
        "--sort",
        "total_return",
        "--out",
        str(out),
    )
    assert run.returncode == 0, run.stderr
    with out.open() as fh:
        rows = list(csv.DictReader(fh))
    assert sorted((r["fast"], r["slow"]) for r in rows) == [
        ("10", "20"),
        ("10", "40"),
        ("5", "20"),
        ("5", "40"),
    ]
    returns = [float(r["total_return"]) for r in rows]
    assert returns == sorted(returns, reverse=True)  # best first
    table = run.stdout.splitlines()
    assert table[0].split()[:3] == ["fast", "slow", "total_return"] and len(table) == 5
    # each row is what one backtest with those settings gives
    best = rows[0]
    single = cli(
        "backtest",
        "--strategy",
        "sma-cross",
        "--candles",
        f,
        "--out",
        str(tmp_path / "one"),
        "--set",
        "qty=0.05",
        "--set",
        f"fast={best['fast']}",
        "--set",
        f"slow={best['slow']}",
    )
    assert single.returncode == 0, single.stderr
    metrics = json.loads((tmp_path / "one" / "metrics.json").read_text())
    assert float(best["total_return"]) == pytest.approx(metrics["total_return"], rel=1e-12)
    assert int(best["round_trips"]) == metrics["round_trips"]


def test_sweep_refuses_a_bad_grid_before_starting(tmp_path, slice_file):
    f = str(slice_file("ETHUSDT", 1))
    run = cli("sweep", "--strategy", "sma-cross", "--candles", f, "--grid", "fsat=1,2")
    assert run.returncode == 2 and "unknown setting 'fsat'" in run.stderr
    run = cli("sweep", "--strategy", "sma-cross", "--candles", f, "--grid", "fast")
    assert run.returncode == 2 and "expected KEY=V1,V2" in run.stderr
    run = cli(
        "sweep", "--strategy", "sma-cross", "--candles", f, "--grid", "fast=5", "--sort", "sharp"
    )
    assert run.returncode == 2 and "--sort 'sharp': not a metric" in run.stderr
    run = cli("sweep", "--strategy", "sma-cross", "--candles", f, "--grid", "fast=5", "--jobs", "0")
    assert run.returncode == 2 and "--jobs 0: at least 1" in run.stderr


def test_walkforward_fits_each_window_and_judges_the_next(tmp_path, slice_file):
    f = str(slice_file("BTCUSDT", 4))
    run = cli(
        "walkforward",
        "--strategy",
        "sma-cross",
        "--candles",
        f,
        "--grid",
        "fast=5,10",
        "--grid",
        "slow=20,40",
        "--set",
        "qty=0.002",
        "--train-days",
        "2",
        "--test-days",
        "1",
        "--step-days",
        "1",
        "--jobs",
        "2",
    )
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert "IS sharpe" in lines[0] and "OOS sharpe" in lines[0]
    folds = lines[1:]
    assert len(folds) == 2  # 4 days: train days 1-2 / test 3, train 2-3 / test 4
    for n, line in enumerate(folds, 1):
        cols = line.split()
        assert cols[0] == str(n)
        assert any(
            s in line
            for s in ("fast=5,slow=20", "fast=5,slow=40", "fast=10,slow=20", "fast=10,slow=40")
        )
    short = cli(
        "walkforward",
        "--strategy",
        "sma-cross",
        "--candles",
        f,
        "--grid",
        "fast=5,10",
        "--train-days",
        "30",
        "--test-days",
        "10",
    )
    assert short.returncode == 2 and "shorter than one training plus one test" in short.stderr
