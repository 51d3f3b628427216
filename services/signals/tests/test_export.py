"""``gridstream signals export``: a real candle file in, every indicator and the regime out."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from signals_factories import DATA, FIXTURES

from gridstream.core.signals.engine import INDICATORS, SignalParams
from gridstream.core.signals.frame import OUTPUT_COLUMNS, compute_frame
from gridstream.signals.export import export, read_candles


def test_export_to_parquet_and_csv_equals_the_batch_frame(tmp_path: Path) -> None:
    src = FIXTURES / "BTCUSDT-5m.csv.gz"
    want = compute_frame(read_candles(src))
    assert export(src, tmp_path / "out.parquet") == want.height == 864
    got = pl.read_parquet(tmp_path / "out.parquet")
    assert got.equals(want)
    assert set(OUTPUT_COLUMNS) <= set(got.columns)
    export(tmp_path / "out.parquet", tmp_path / "again.csv", SignalParams())  # parquet in
    csv = pl.read_csv(tmp_path / "again.csv", infer_schema_length=None)
    assert csv.height == 864
    assert csv["regime"].to_list() == want["regime"].to_list()
    for name in INDICATORS:
        a, b = csv[name].fill_null(0.0).to_list(), want[name].fill_null(0.0).to_list()
        assert max(abs(x - y) for x, y in zip(a, b, strict=True)) <= 1e-9 * 1e5, name


def test_cli_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from gridstream.cli.main import main

    out = tmp_path / "sig.parquet"
    with pytest.raises(SystemExit) as exit_:
        main(["signals", "export", "--candles", str(DATA / "SOLUSDT-1m.csv.gz"), "--out", str(out)])
    assert exit_.value.code == 0
    assert "wrote 43199 rows" in capsys.readouterr().out
    df = pl.read_parquet(out)
    assert df.height == 43199
    assert set(df["regime"].unique()) == {
        "warmup",
        "range",
        "trend_up",
        "trend_down",
        "high_volatility",
    }
    with pytest.raises(SystemExit) as exit_:
        main(["signals", "export", "--candles", str(out), "--out", str(tmp_path / "x.txt")])
    assert exit_.value.code == 2
