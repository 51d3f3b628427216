"""``gridstream backtest`` as a user runs it: real candle files in, the four outputs out."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import polars as pl
import pytest

METRIC_KEYS = {
    "total_return",
    "cagr",
    "sharpe",
    "sortino",
    "calmar",
    "max_drawdown",
    "max_drawdown_duration_ms",
    "win_rate",
    "profit_factor",
    "exposure",
    "turnover",
    "fees",
    "round_trips",
    "grid_profit",
    "inventory_pnl",
    "buy_and_hold",
}


def backtest(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GS_")}
    return subprocess.run(
        [sys.executable, "-m", "gridstream.cli", "backtest", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env=env,
        cwd=cwd,
    )


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


def test_grid_on_two_symbols_writes_every_output(tmp_path, slice_file):
    files = [str(slice_file(s, 3)) for s in ("BTCUSDT", "ETHUSDT")]
    out = tmp_path / "out"
    run = backtest("--strategy", "grid", "--candles", *files, "--out", str(out), "--cash", "700")
    assert run.returncode == 0, run.stderr
    assert "buy & hold" in run.stdout and "max_drawdown" in run.stdout
    fills = read_csv(out / "fills.csv")
    assert list(fills[0]) == [
        "time",
        "symbol",
        "side",
        "price",
        "qty",
        "fee",
        "fee_asset",
        "liquidity",
        "client_order_id",
    ]
    assert {f["symbol"] for f in fills} == {"BTCUSDT", "ETHUSDT"}
    assert {f["liquidity"] for f in fills} >= {"maker"}
    # Binance's rule by default: a buy pays its fee in the base asset, a sell in the quote
    assert all(
        f["fee_asset"] == ("USDT" if f["side"] == "SELL" else f["symbol"][:3]) for f in fills
    )
    equity = read_csv(out / "equity.csv")
    assert list(equity[0]) == ["time", "equity", "pos_BTCUSDT", "pos_ETHUSDT"]
    assert len(equity) == 3 * 1440  # one row per close time
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) >= METRIC_KEYS
    assert metrics["round_trips"] > 0 and metrics["fills"] == len(fills)
    assert 0 <= metrics["max_drawdown"] < 1
    # the books balance: equity change = realised + unrealised - fees
    change = Decimal(equity[-1]["equity"]) - Decimal(700)
    parts = metrics["grid_profit"] + metrics["inventory_pnl"] - metrics["fees"]
    assert float(change) == pytest.approx(parts, abs=1e-6)
    assert set(metrics["buy_and_hold"]) >= {"total_return", "sharpe", "max_drawdown"}
    html = (out / "report.html").read_text()
    assert "<script" in html and "http://" not in html.replace("http://www.w3.org/2000/svg", "")
    assert html.count('class="plot"') == 4  # equity, drawdown, one price plot per symbol


def test_rejected_orders_are_counted_by_reason_and_told(tmp_path, slice_file):
    """Too little cash for the grid's buys: the venue's balance check rejects them, and the
    trader is told how many and why (metrics.json and the command's output)."""
    files = [str(slice_file("BTCUSDT", 1))]
    out = tmp_path / "out"
    run = backtest("--strategy", "grid", "--candles", *files, "--out", str(out), "--cash", "30")
    assert run.returncode == 0, run.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["rejected_orders"] > 0
    assert metrics["rejections"] == {"INSUFFICIENT_BALANCE": metrics["rejected_orders"]}
    assert f"{metrics['rejected_orders']:,} orders rejected (INSUFFICIENT_BALANCE" in run.stdout
    run = backtest("--strategy", "grid", "--candles", *files, "--out", str(out), "--cash", "1e6")
    assert json.loads((out / "metrics.json").read_text())["rejected_orders"] == 0
    assert "orders rejected" not in run.stdout


def test_parquet_and_csv_give_the_same_backtest(tmp_path, slice_file):
    csv_file = slice_file("SOLUSDT", 2)
    pq = tmp_path / "sol.parquet"
    df = pl.read_csv(csv_file, infer_schema_length=0).select(
        pl.lit("SOLUSDT").alias("symbol"),
        pl.col("open_time_ms").cast(pl.Int64).alias("open_time"),
        *(pl.col(c) for c in ("open", "high", "low", "close", "volume")),
    )
    df.write_parquet(pq)
    a, b = tmp_path / "a", tmp_path / "b"
    assert (
        backtest("--strategy", "sma-cross", "--candles", str(csv_file), "--out", str(a)).returncode
        == 0
    )
    run = backtest("--strategy", "sma-cross", "--candles", str(pq), "--out", str(b))
    assert run.returncode == 0, run.stderr
    assert (a / "fills.csv").read_text() == (b / "fills.csv").read_text()
    assert (a / "equity.csv").read_text() == (b / "equity.csv").read_text()
    assert len(read_csv(a / "fills.csv")) > 10


def test_settings_config_and_flags(tmp_path, slice_file):
    f = str(slice_file("BTCUSDT", 2))
    cfg = tmp_path / "bt.toml"
    cfg.write_text(
        "[strategy]\nfast = 5\nslow = 20\nqty = '0.002'\n"
        "[fill]\nfee_in_quote = true\n[backtest]\ncash = 1000\n"
    )
    run = backtest(
        "--strategy",
        "sma-cross",
        "--candles",
        f,
        "--out",
        str(tmp_path / "o"),
        "--config",
        str(cfg),
        "--set",
        "qty=0.001",
        "--fee",
        "0.0005",
    )
    assert run.returncode == 0, run.stderr
    fills = read_csv(tmp_path / "o" / "fills.csv")
    assert fills and {f["qty"] for f in fills} == {"0.001"}  # --set wins over the file
    assert all(f["fee_asset"] == "USDT" for f in fills)
    first = fills[0]
    assert Decimal(first["fee"]) == (
        Decimal(first["price"]) * Decimal(first["qty"]) * Decimal("0.0005")
    ).quantize(Decimal("1e-8"))
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert metrics["start_equity"] == 1000
    # the strategy trades the candles' interval unless told otherwise
    assert metrics["settings"] == {"fast": "5", "slow": "20", "qty": "0.001", "interval": "1m"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "fsat=3"], r"unknown setting 'fsat'"),
        (["--set", "fast=ten"], r"fast='ten' is not a valid int"),
        (["--set", "fast=40"], r"fast must be shorter than slow"),
        (["--cash", "lots"], r"--cash 'lots'"),
    ],
)
def test_bad_settings_are_named(tmp_path, slice_file, args, message):
    f = str(slice_file("BTCUSDT", 1))
    run = backtest("--strategy", "sma-cross", "--candles", f, "--out", str(tmp_path / "o"), *args)
    assert run.returncode == 2
    assert re.search(message, run.stderr), run.stderr
    assert not (tmp_path / "o").exists()


def test_bad_files_are_named(tmp_path):
    bad = tmp_path / "BTCUSDT-1m.csv"
    bad.write_text("open_time_ms,open,high,low,close,volume\n1,2,3,1,2,x\n")
    run = backtest("--strategy", "sma-cross", "--candles", str(bad), "--out", str(tmp_path / "o"))
    assert run.returncode == 2 and "bad candle row 2" in run.stderr
    run = backtest("--strategy", "sma-cross", "--candles", str(tmp_path / "nope.csv"), "--out", "o")
    assert run.returncode == 2 and "no such file" in run.stderr
    twice = tmp_path / "ETHUSDT-1m.csv"
    twice.write_text("open_time_ms,open,high,low,close,volume\n0,1,1,1,1,1\n0,1,1,1,1,1\n")
    run = backtest("--strategy", "sma-cross", "--candles", str(twice), "--out", "o")
    assert run.returncode == 2 and "open time 0 appears twice" in run.stderr
    anon = tmp_path / "candles.csv"
    anon.write_text("open_time_ms,open,high,low,close,volume\n0,1,1,1,1,1\n")
    run = backtest("--strategy", "sma-cross", "--candles", str(anon), "--out", "o")
    assert run.returncode == 2 and "no symbol" in run.stderr


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_report_draws_every_plot_in_headless_chromium(tmp_path, slice_file):
    browser = chromium()
    if browser is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("chromium is not installed (.ci/run installs Debian's chromium)")
        pytest.skip("chromium not installed (Debian: apt-get install chromium)")
    files = [str(slice_file(s, 2)) for s in ("BTCUSDT", "XRPUSDT")]
    out = tmp_path / "out"
    assert backtest("--strategy", "grid", "--candles", *files, "--out", str(out)).returncode == 0
    page = (out / "report.html").resolve().as_uri()
    run = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--enable-logging=stderr",
            "--v=0",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--virtual-time-budget=5000",
            "--dump-dom",
            page,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    dom = run.stdout
    assert 'data-ready="1"' in dom, run.stderr[-2000:]
    plots = re.findall(r'<svg class="plot" id="([\w-]+)"([^>]*)>', dom)
    assert [p[0] for p in plots] == ["equity", "drawdown", "price-0", "price-1"]
    assert all('data-drawn="1"' in attrs for _id, attrs in plots)
    # every plot has a drawn line with many points, and the price plots show fills
    for pid in ("equity", "drawdown", "price-0", "price-1"):
        body = dom.split(f'id="{pid}"', 1)[1].split("</svg>", 1)[0]
        path = re.search(r'<path d="(M[^"]+)"', body)
        assert path is not None and path.group(1).count("L") > 100, pid
    assert dom.split('id="price-0"', 1)[1].split("</svg>", 1)[0].count("<circle") > 0
    errors = re.search(r'<div id="errors">(.*?)</div>', dom, re.S)
    assert errors is not None and errors.group(1).strip() == ""
    assert "Uncaught" not in run.stderr and "CONSOLE" not in run.stderr.replace("CONSOLE(0)", "")


def test_a_run_pauses_the_garbage_collector_and_restores_it():
    import gc

    from gridstream.cli.backtest import gc_paused

    with gc_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()  # left as it was found
    finally:
        gc.enable()


@pytest.mark.parametrize(
    "text",
    [
        # the repo's layout, rows out of order, extra columns the backtest does not read
        "open_time_ms,open,high,low,close,volume,close_time,x\n"
        "120000,2,2.5,1.5,2.25,7,179999,q\n60000,1,2,0.5,1.5,10,119999,q\n",
        # Binance's headerless kline CSV
        "60000,1,2,0.5,1.5,10,119999,0,0,0,0,0\n120000,2,2.5,1.5,2.25,7,179999,0,0,0,0,0\n",
        # names in any case, padded, quoted, in any order; open_time for open_time_ms
        '"volume", Open ,HIGH,low,close,open_time\n10,1,2,0.5,1.5,60000\n7,2,2.5,1.5,2.25,120000\n',
        # the same name twice: read whole, as ever
        "open_time_ms,open,high,low,close,volume,x,x\n"
        "60000,1,2,0.5,1.5,10,a,b\n120000,2,2.5,1.5,2.25,7,a,b\n",
    ],
)
def test_candle_files_load_the_columns_a_backtest_reads_sorted_by_open_time(tmp_path, text):
    from gridstream.cli.backtest import load_file

    path = tmp_path / "BTCUSDT-1m.csv"
    path.write_text(text)
    (bars,) = load_file(path)
    assert (bars.symbol, bars.interval) == ("BTCUSDT", "1m")
    assert bars.open_time.tolist() == [60000, 120000]
    assert (bars.open, bars.high, bars.low) == (["1", "2"], ["2", "2.5"], ["0.5", "1.5"])
    assert (bars.close, bars.volume) == (["1.5", "2.25"], ["10", "7"])
    assert bars.close_units.tolist() == [150_000_000, 225_000_000]


def test_text_column_is_the_text_of_every_value_in_order():
    from gridstream.cli.backtest import text_column

    a, b = Decimal("1.50"), Decimal("-2E+3")
    values = [a, a, a, b, Decimal("1.50"), a, b, b]
    assert text_column(values).to_list() == [str(v) for v in values]
    assert text_column([a, b]).to_list() == ["1.50", "-2E+3"]
    assert text_column([]).to_list() == []
