"""Fixtures of the CLI tests: real candles cut to the size a test needs."""

from __future__ import annotations

import gzip
from collections.abc import Callable
from pathlib import Path

import pytest

KLINES = Path(__file__).resolve().parents[3] / "data" / "klines"


@pytest.fixture
def slice_file(tmp_path: Path) -> Callable[[str, float], Path]:
    """``slice_file(symbol, days)``: the first ``days`` days of a real 1m file of
    data/klines, as a CSV of the same layout (``SYMBOL-1m.csv``) in the test's tmp_path."""

    def cut(symbol: str, days: float) -> Path:
        out = tmp_path / f"{symbol}-1m.csv"
        with gzip.open(KLINES / f"{symbol}-1m.csv.gz", "rt") as src, out.open("w") as dst:
            for n, line in enumerate(src):
                if n > days * 1440:
                    break
                dst.write(line)
        return out

    return cut
