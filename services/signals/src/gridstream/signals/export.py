"""Every indicator and the regime for a candle file, through the batch path (research).

Input: CSV (Binance kline header ``open_time_ms,open,high,low,close,volume,...`` as in
data/klines, or ``open_time`` instead of ``open_time_ms``; gzip allowed) or Parquet, with
optional ``symbol``/``interval`` columns. Output by extension: ``.parquet`` or ``.csv``.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from gridstream.core.signals.engine import SignalParams
from gridstream.core.signals.frame import compute_frame

_NEEDED = ("open_time", "high", "low", "close")


def read_candles(path: Path) -> pl.DataFrame:
    """A candle file as a frame with ``open_time`` (ms) and float OHLCV columns."""
    name = path.name.lower()
    if name.endswith(".parquet"):
        df = pl.read_parquet(path)
    elif name.endswith((".csv", ".csv.gz")):
        df = pl.read_csv(path, infer_schema_length=10_000)
    else:
        raise ValueError(f"{path}: expected .csv, .csv.gz or .parquet")
    if "open_time" not in df.columns and "open_time_ms" in df.columns:
        df = df.rename({"open_time_ms": "open_time"})
    missing = [c for c in _NEEDED if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)}")
    floats = [c for c in ("open", "high", "low", "close", "volume") if c in df.columns]
    return df.with_columns(pl.col("open_time").cast(pl.Int64), pl.col(floats).cast(pl.Float64))


def export(candles: Path, out: Path, params: SignalParams | None = None) -> int:
    """Write ``candles`` with every indicator and the regime to ``out``; returns the rows."""
    suffix = out.name.lower()
    if not suffix.endswith((".parquet", ".csv")):
        raise ValueError(f"{out}: expected .parquet or .csv")
    frame = compute_frame(read_candles(candles), params)
    out.parent.mkdir(parents=True, exist_ok=True)
    if suffix.endswith(".parquet"):
        frame.write_parquet(out)
    else:
        frame.write_csv(out)
    return frame.height
