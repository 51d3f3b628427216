"""``gridstream backtest``: a strategy of the kernel over candles from files or Postgres.

    gridstream backtest --strategy NAME --candles PATH [PATH...] --out DIR
        [--set KEY=VALUE]... [--config FILE.toml] [--cash 700] [--fee 0.001]
        [--slippage-bps 0]

Candles: CSV (the repo's ``data/klines`` layout, ``open_time_ms,open,high,low,close,
volume,...``, or Binance's headerless kline CSV), gzipped or not, or Parquet with the
same columns (``open_time`` accepted for ``open_time_ms``); the symbol comes from a
``symbol`` column or the file name (``BTCUSDT-1m.csv.gz``), the interval from the file
name or the spacing of the open times. ``db:BTCUSDT,ETHUSDT[@1m]`` reads the ``candles``
table of ``DATABASE_URL`` instead. No Redis and no Postgres are needed for files.

``--out DIR`` gets (columns in docs/backtest.md):

* ``fills.csv``: time (epoch ms), symbol, side, price, qty, fee, fee_asset, liquidity,
  client_order_id;
* ``equity.csv``: time (epoch ms, the bar's close), equity, then one ``pos_<SYMBOL>``
  column per symbol (base units held);
* ``metrics.json``: :mod:`gridstream.core.performance` (definitions there);
* ``report.html``: one offline file: equity, drawdown, and per symbol the price with the
  grid levels and the fills.

The config file (TOML) may hold ``[strategy]`` (the ``--set`` keys), ``[fill]`` (the
:class:`~gridstream.core.backtest.FillSettings` fields: ``maker_fee``, ``taker_fee``,
``fee_in_quote``, ``volume_share``, ``queue``, ``latency_ms``, ``slippage_bps``,
``[fill.fees.<SYMBOL>]`` with ``maker``/``taker``, ``[fill.tick_sizes]``) and
``[backtest]`` (``cash``). Command-line values win over the file.
"""

from __future__ import annotations

import contextlib
import csv
import gc
import gzip
import json
import math
import sys
import time
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import fields
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Final

import numpy as np
import polars as pl

from gridstream.common.binance.filters import SymbolFilters, parse_exchange_info
from gridstream.common.intervals import INTERVAL_MS
from gridstream.core import performance
from gridstream.core.backtest import (
    CLOSE_PLACES,
    Backtester,
    BacktestResult,
    Bars,
    ColumnarStrategy,
    FillSettings,
    SkippingStrategy,
    one_timeline,
    price_units,
)
from gridstream.core.risk import DEFAULT_MAX_EXPOSURE_QUOTE, RiskEngine
from gridstream.core.signals.batch import BatchSignals, SeriesColumns, SignalSource
from gridstream.core.signals.engine import SignalEngine
from gridstream.core.strategies import (
    STRATEGIES,
    Strategy,
    StrategySettingsError,
    make,
    with_interval,
)
from gridstream.core.strategies.grid import QUOTE_ASSETS, base_asset

DB_PREFIX: Final = "db:"
FILLS_CSV: Final = "fills.csv"
EQUITY_CSV: Final = "equity.csv"
METRICS_JSON: Final = "metrics.json"
REPORT_HTML: Final = "report.html"
FILL_COLUMNS: Final = (
    "time",
    "symbol",
    "side",
    "price",
    "qty",
    "fee",
    "fee_asset",
    "liquidity",
    "client_order_id",
)
#: Runs longer than this many candles show a progress bar (on a terminal).
PROGRESS_FROM: Final = 200_000
_NAME_OF_MS: Final = {ms: name for name, ms in INTERVAL_MS.items()}


class BacktestError(Exception):
    """Bad input to the backtest; the message says which and why."""


def _symbol_from_name(path: Path) -> str | None:
    stem = path.name.split(".")[0]
    head = stem.split("-")[0].upper()
    return head if any(head.endswith(q) and len(head) > len(q) for q in QUOTE_ASSETS) else None


def _interval_from_name(path: Path) -> str | None:
    stem = path.name.split(".")[0]
    parts = stem.split("-")
    return parts[1] if len(parts) > 1 and parts[1] in INTERVAL_MS else None


def _first_line(path: Path) -> str:
    with path.open("rb") as fh:
        head = fh.read(2)
    opener = gzip.open if head == b"\x1f\x8b" else open
    with opener(path, "rt", encoding="ascii") as fh:
        return str(fh.readline())


#: The columns a backtest reads (lower-case, stripped); a file's others are not parsed.
_READ_COLUMNS: Final = frozenset(
    {"open_time_ms", "open_time", "open", "high", "low", "close", "volume", "symbol"}
)
_HEADERLESS_NAMES: Final = ("open_time_ms", "open", "high", "low", "close", "volume")


def _csv_columns(first: str, headerless: bool) -> list[str] | list[int] | None:
    """Which columns of a CSV whose first line is ``first`` to read: the names in its
    header that a backtest reads, the first six of a headerless file, or None (all) when
    the header's names are not plainly distinct."""
    if headerless:
        return list(range(len(_HEADERLESS_NAMES)))
    names = next(csv.reader([first.rstrip("\r\n")]), [])
    if len(set(names)) != len(names):
        return None
    return [c for c in names if c.strip().lower() in _READ_COLUMNS]


def _read_csv(path: Path, headerless: bool, wanted: list[str] | list[int] | None) -> pl.DataFrame:
    """The ``wanted`` columns of a CSV as text; all of them if those cannot be read (then
    the same errors as ever)."""
    if wanted:
        try:
            return pl.read_csv(
                path, has_header=not headerless, infer_schema_length=0, columns=wanted
            )
        except pl.exceptions.PolarsError:
            pass
    return pl.read_csv(path, has_header=not headerless, infer_schema_length=0)


def _frame(path: Path) -> pl.DataFrame:
    """The columns a backtest reads, as text (exact prices), lower-case names."""
    if path.suffix == ".parquet":
        df = pl.read_parquet(path)
        df = df.select([pl.col(c).cast(pl.Utf8) for c in df.columns])
    else:
        first = _first_line(path)
        if not first.strip():
            raise BacktestError(f"{path}: empty file")
        headerless = first.split(",")[0].strip().isdigit()
        df = _read_csv(path, headerless, _csv_columns(first, headerless))
        if headerless:
            df = df.rename(dict(zip(df.columns, _HEADERLESS_NAMES, strict=False)))
    return df.rename({c: c.strip().lower() for c in df.columns})


def close_units(closes: pl.Series) -> np.ndarray | None:
    """Closes as integers of 10**-8 (None if one has more decimals or is not plain)."""
    return price_units(closes, CLOSE_PLACES)


def _check_numbers(path: Path, g: pl.DataFrame, columns: Sequence[str]) -> None:
    """Every value of ``columns`` a finite number, else the first row that is not, named."""
    finite = [
        pl.col(c).cast(pl.Float64, strict=False).is_finite().fill_null(False) for c in columns
    ]
    if g.select(pl.all_horizontal([f.all() for f in finite])).item():
        return
    bad_rows = g.select([(~f).alias(c) for f, c in zip(finite, columns, strict=True)])
    row = int(bad_rows.select(pl.any_horizontal(pl.all()))[:, 0].arg_true()[0])
    col = next(c for c in columns if bad_rows[c][row])
    raise BacktestError(f"{path}: bad candle row {row + 2}: {col}={g[col][row]!r}")


def load_file(path: Path) -> list[Bars]:
    """The candles of one file, by symbol, sorted by open time."""
    if not path.exists():
        raise BacktestError(f"{path}: no such file")
    try:
        df = _frame(path)
    except (OSError, UnicodeDecodeError, gzip.BadGzipFile, pl.exceptions.PolarsError) as exc:
        raise BacktestError(f"{path}: cannot read: {exc}") from None
    if "open_time_ms" not in df.columns and "open_time" in df.columns:
        df = df.rename({"open_time": "open_time_ms"})
    needed = ("open_time_ms", "open", "high", "low", "close", "volume")
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise BacktestError(f"{path}: missing column(s) {', '.join(missing)}")
    named = _symbol_from_name(path)
    if "symbol" in df.columns:
        groups = {
            str(k[0] if isinstance(k, tuple) else k).upper(): g
            for k, g in df.group_by("symbol", maintain_order=True)
        }
    elif named is not None:
        groups = {named: df}
    else:
        raise BacktestError(f"{path}: no symbol column and no symbol in the file name")
    out = []
    for symbol, g in groups.items():
        try:
            g = g.with_columns(pl.col("open_time_ms").cast(pl.Int64, strict=True))
        except pl.exceptions.PolarsError as exc:
            raise BacktestError(f"{path}: bad open time: {exc}") from None
        opens = g["open_time_ms"].to_numpy()
        if len(opens) > 1 and not bool((opens[1:] > opens[:-1]).all()):
            g = g.sort("open_time_ms")
            opens = g["open_time_ms"].to_numpy()
        _check_numbers(path, g, needed[1:])
        repeated = np.flatnonzero(np.diff(opens) <= 0)
        if len(repeated):
            raise BacktestError(
                f"{path}: {symbol}: open time {int(opens[repeated[0] + 1])} appears twice"
            )
        interval = _interval_from_name(path)
        if interval is None:
            gaps = np.diff(opens)
            step = int(gaps.min()) if len(gaps) else 60_000
            interval = _NAME_OF_MS.get(step)
            if interval is None:
                raise BacktestError(f"{path}: open times {step} ms apart: not a kline interval")
        units = close_units(g["close"])
        out.append(
            Bars(
                symbol=symbol,
                interval=interval,
                interval_ms=INTERVAL_MS[interval],
                open_time=opens,
                open=g["open"].to_list(),
                high=g["high"].to_list(),
                low=g["low"].to_list(),
                close=g["close"].to_list(),
                volume=g["volume"].to_list(),
                close_units=units if units is not None else np.zeros(0, dtype=np.int64),
                source="file",
            )
        )
    return out


async def _load_db(spec: str, database_url: str) -> list[Bars]:
    import asyncpg

    body = spec[len(DB_PREFIX) :]
    symbols_part, _, interval = body.partition("@")
    interval = interval or "1m"
    if interval not in INTERVAL_MS:
        raise BacktestError(f"{spec}: unknown interval {interval!r}")
    symbols = [s.strip().upper() for s in symbols_part.split(",") if s.strip()]
    conn = await asyncpg.connect(database_url)
    try:
        out = []
        for symbol in symbols:
            rows = await conn.fetch(
                "SELECT open_time, open, high, low, close, volume FROM candles"
                " WHERE symbol = $1 AND interval = $2 ORDER BY open_time",
                symbol,
                interval,
            )
            if not rows:
                raise BacktestError(f"{spec}: no {interval} candles of {symbol} in the database")
            closes = pl.Series([str(r["close"]) for r in rows])
            units = close_units(closes)
            out.append(
                Bars(
                    symbol=symbol,
                    interval=interval,
                    interval_ms=INTERVAL_MS[interval],
                    open_time=np.asarray([r["open_time"] for r in rows], dtype=np.int64),
                    open=[str(r["open"]) for r in rows],
                    high=[str(r["high"]) for r in rows],
                    low=[str(r["low"]) for r in rows],
                    close=closes.to_list(),
                    volume=[str(r["volume"]) for r in rows],
                    close_units=units if units is not None else np.zeros(0, dtype=np.int64),
                    source="db",
                )
            )
        return out
    finally:
        await conn.close()


def load_candles(specs: Sequence[str], database_url: str | None = None) -> dict[str, Bars]:
    """Every candle named by ``--candles``, one interval for all, by symbol."""
    import asyncio

    series: list[Bars] = []
    for spec in specs:
        if spec.startswith(DB_PREFIX):
            if not database_url:
                raise BacktestError(f"{spec}: DATABASE_URL is not set")
            series += asyncio.run(_load_db(spec, database_url))
        else:
            series += load_file(Path(spec))
    by_symbol: dict[str, Bars] = {}
    for s in series:
        if s.symbol in by_symbol:
            raise BacktestError(f"{s.symbol}: candles given twice")
        by_symbol[s.symbol] = s
    intervals = {s.interval for s in by_symbol.values()}
    if len(intervals) > 1:
        raise BacktestError(f"one interval per backtest, got {sorted(intervals)}")
    if not by_symbol:
        raise BacktestError("no candles")
    return by_symbol


def columnar(strategy: object, bars: Mapping[str, Bars]) -> bool:
    """Can this run take the columnar path (same fills, fewer steps)?"""
    if not isinstance(strategy, ColumnarStrategy):
        return False
    if any(len(b.close_units) != len(b) for b in bars.values()):
        return False
    return one_timeline(bars)


# -- settings ------------------------------------------------------------------------------
def fill_settings(table: Mapping[str, Any], fee: str | None, slippage: str | None) -> FillSettings:
    """:class:`FillSettings` from the config's ``[fill]`` and the command line."""
    known = {f.name for f in fields(FillSettings)} | {"fees"}
    unknown = sorted(set(table) - known)
    if unknown:
        raise BacktestError(f"[fill]: unknown key(s) {', '.join(unknown)} (known: {sorted(known)})")
    kw: dict[str, Any] = {}
    try:
        for name in ("maker_fee", "taker_fee", "slippage_bps", "default_tick"):
            if name in table:
                kw[name] = Decimal(str(table[name]))
        if table.get("volume_share") is not None:
            kw["volume_share"] = Decimal(str(table["volume_share"]))
        for name in ("latency_ms", "fee_places"):
            if name in table:
                kw[name] = int(table[name])
        if "queue" in table:
            kw["queue"] = str(table["queue"])
        if "fee_in_quote" in table:
            kw["fee_in_quote"] = bool(table["fee_in_quote"])
        if "fees" in table:
            kw["fees_by_symbol"] = {
                sym.upper(): (Decimal(str(v["maker"])), Decimal(str(v["taker"])))
                for sym, v in table["fees"].items()
            }
        if "tick_sizes" in table:
            kw["tick_sizes"] = {k.upper(): Decimal(str(v)) for k, v in table["tick_sizes"].items()}
        if fee is not None:
            kw["maker_fee"] = kw["taker_fee"] = Decimal(fee)
        if slippage is not None:
            kw["slippage_bps"] = Decimal(slippage)
        return FillSettings(**kw)
    except (InvalidOperation, KeyError, TypeError, ValueError) as exc:
        raise BacktestError(f"fill settings: {exc}") from None


def venue_filters(path: str | None, symbols: Sequence[str]) -> dict[str, SymbolFilters] | None:
    """The symbols' filters from a saved ``GET /api/v3/exchangeInfo`` answer (None: none)."""
    if path is None:
        return None
    try:
        payload = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise BacktestError(f"--exchange-info {path}: {exc}") from None
    filters = parse_exchange_info(payload, list(symbols))
    missing = sorted(set(symbols) - set(filters))
    if missing:
        raise BacktestError(f"--exchange-info {path}: no filters for {', '.join(missing)}")
    return filters


def risk_engine(
    table: Mapping[str, Any],
    filters: Mapping[str, SymbolFilters] | None,
    symbols: Sequence[str],
    max_exposure: str | None,
) -> RiskEngine | None:
    """The risk service's engine for the run, when the venue's filters, ``--max-exposure``
    or a ``[risk]`` table ask for it (else None: the venue's balance checks only)."""
    unknown = sorted(set(table) - {"max_exposure_quote"})
    if unknown:
        raise BacktestError(f"[risk]: unknown key(s) {', '.join(unknown)}")
    if filters is None and max_exposure is None and not table:
        return None
    text = max_exposure or str(table.get("max_exposure_quote", DEFAULT_MAX_EXPOSURE_QUOTE))
    try:
        limit = Decimal(text)
    except InvalidOperation:
        raise BacktestError(f"max exposure {text!r}: not a number") from None
    if not limit > 0:
        raise BacktestError(f"max exposure {text}: must be > 0")
    # without the venue's filters every limit is "not set" (0): only risk's own rules
    rules = dict(filters) if filters is not None else {s: SymbolFilters(symbol=s) for s in symbols}
    return RiskEngine(rules, max_exposure_quote=limit)


def parse_sets(items: Sequence[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise BacktestError(f"--set {item!r}: expected KEY=VALUE")
        out[key.strip()] = value.strip()
    return out


def read_config(path: str | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        return tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise BacktestError(f"{path}: {exc}") from None


# -- outputs -------------------------------------------------------------------------------
def write_fills(result: BacktestResult, path: Path) -> None:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(FILL_COLUMNS)
        for f in result.fills:
            w.writerow(
                [
                    f.time_ms,
                    f.symbol,
                    f.side,
                    f.price,
                    f.qty,
                    f.fee,
                    f.fee_asset,
                    f.liquidity,
                    f.client_order_id,
                ]
            )


def text_column(values: Sequence[object]) -> pl.Series:
    """``str`` of every value as a text column, made once per run of one object: an
    equity curve holds the same ``Decimal`` over every bar its balances do not move (the
    equity while flat, a position throughout), so most of its million texts are repeats."""
    n = len(values)
    if not n:
        return pl.Series([], dtype=pl.Utf8)
    ids = np.fromiter(map(id, values), dtype=np.uint64, count=n)
    starts = np.flatnonzero(np.concatenate(([True], ids[1:] != ids[:-1])))
    texts = pl.Series([str(values[i]) for i in starts.tolist()], dtype=pl.Utf8)
    if len(starts) == n:
        return texts
    run = np.repeat(np.arange(len(starts)), np.diff(np.append(starts, n)))
    return texts.gather(run)


def write_equity(result: BacktestResult, path: Path) -> None:
    curve = result.equity
    columns = [
        pl.Series("time", curve.times, dtype=pl.Int64),
        text_column(curve.equity).alias("equity"),
        *(text_column(curve.positions[n]).alias(f"pos_{s}") for n, s in enumerate(result.symbols)),
    ]
    pl.DataFrame(columns).write_csv(path)


def _clean(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    return obj


def table(metrics: Mapping[str, Any]) -> str:
    """The terminal view: our figures beside buy-and-hold's."""
    bh = metrics.get("buy_and_hold", {})
    pct = {"total_return", "cagr", "max_drawdown", "win_rate", "exposure"}
    rows = performance.HEADLINE

    def fmt(key: str, v: Any) -> str:
        if v is None or v == "":
            return "-"
        if isinstance(v, str):
            return v
        if key in pct:
            return f"{v * 100:.2f}%"
        if key == "max_drawdown_duration_ms":
            return f"{v / 3_600_000:.1f} h"
        if isinstance(v, int):
            return f"{v:,}"
        return f"{v:,.4f}" if abs(v) < 1000 else f"{v:,.2f}"

    lines = [f"{'metric':<26}{'strategy':>16}{'buy & hold':>16}"]
    for key in rows:
        lines.append(f"{key:<26}{fmt(key, metrics.get(key)):>16}{fmt(key, bh.get(key, '')):>16}")
    return "\n".join(lines)


# -- the command ---------------------------------------------------------------------------
def simulate(
    strat: Strategy,
    series: Mapping[str, Bars],
    fill: FillSettings,
    cash: Decimal,
    *,
    progress: bool | None = None,
    risk: RiskEngine | None = None,
) -> BacktestResult:
    """One run of ``strat`` over ``series``: columnar when it can be, else candle by candle;
    every intent through ``risk`` first when given."""
    first = next(iter(series.values()))
    symbols = {s: (base_asset(s), s[len(base_asset(s)) :]) for s in series}
    signals: SignalSource = SignalEngine(base=first.interval)
    if strat.wants_signals:
        # every candle is known before the run: the signals made at once, as the engine's
        signals = BatchSignals(
            {s: SeriesColumns.of_bars(b) for s, b in series.items()}, interval=first.interval
        )
    bt = Backtester(
        strat,
        symbols,
        cash=cash,
        fill=fill,
        interval_ms=first.interval_ms,
        signals=signals,
        risk=risk,
    )
    total = sum(len(s) for s in series.values())
    bar = None
    if progress is not False and total >= PROGRESS_FROM:
        from tqdm import tqdm

        bar = tqdm(
            total=total, unit="candle", file=sys.stderr, disable=None if progress is None else False
        )
    tell = bar.update if bar is not None else None
    try:
        if risk is None and columnar(strat, series):
            return bt.run_columnar(series, tell)
        if (
            isinstance(strat, SkippingStrategy)
            and isinstance(signals, BatchSignals)
            and one_timeline(series)
        ):
            # the same fills, stepping only the candles where something can happen
            return bt.run_skipping(series, tell)
        return bt.run({s: v.candles() for s, v in series.items()}, tell)
    finally:
        if bar is not None:
            bar.close()


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """The cyclic garbage collector off for the block (back on after, if it was on).

    A backtest makes millions of objects that live to its end (the candles' text, the
    equity curve, fills, orders) and no garbage that needs more than reference counting,
    bar a few hundred small cycles; with the collector on, every full collection walks
    all of them again: about 2 s of a 1M-bar ``sma-cross`` run, for nothing.
    """
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


@gc_paused()
def run(
    *,
    strategy: str,
    candles: Sequence[str],
    out: Path,
    sets: Sequence[str] = (),
    config: str | None = None,
    cash: str | None = None,
    fee: str | None = None,
    slippage_bps: str | None = None,
    database_url: str | None = None,
    progress: bool | None = None,
    write: Any = None,
    exchange_info: str | None = None,
    max_exposure: str | None = None,
) -> dict[str, Any]:
    """Run one backtest and write ``out``; returns the metrics (the garbage collector
    paused meanwhile: :func:`gc_paused`)."""
    from .report import write_report

    emit = write or (lambda text: print(text))
    t0 = time.perf_counter()
    cfg = read_config(config)
    settings = {k: str(v) for k, v in cfg.get("strategy", {}).items()}
    settings.update(parse_sets(sets))
    series = load_candles(candles, database_url)
    interval = next(iter(series.values())).interval
    settings = with_interval(strategy, settings, interval)
    filters = venue_filters(exchange_info, list(series))
    try:
        strat = make(strategy, settings, filters)
    except StrategySettingsError as exc:
        raise BacktestError(str(exc)) from None
    fill = fill_settings(cfg.get("fill", {}), fee, slippage_bps)
    cash_text = cash if cash is not None else str(cfg.get("backtest", {}).get("cash", "700"))
    try:
        start_cash = Decimal(cash_text)
    except InvalidOperation:
        raise BacktestError(f"--cash {cash_text!r}: not a number") from None
    total = sum(len(s) for s in series.values())
    risk = risk_engine(cfg.get("risk", {}), filters, list(series), max_exposure)
    result = simulate(strat, series, fill, start_cash, progress=progress, risk=risk)
    metrics = performance.compute(result)
    metrics["strategy"] = strategy
    metrics["settings"] = settings
    metrics["symbols"] = list(result.symbols)
    metrics["interval"] = interval
    out.mkdir(parents=True, exist_ok=True)
    write_fills(result, out / FILLS_CSV)
    write_equity(result, out / EQUITY_CSV)
    (out / METRICS_JSON).write_text(json.dumps(_clean(metrics), indent=2, sort_keys=True) + "\n")
    write_report(result, metrics, series, out / REPORT_HTML)
    elapsed = time.perf_counter() - t0
    emit(
        f"{strategy} over {total:,} {interval} candles of {', '.join(result.symbols)}: "
        f"{len(result.fills):,} fills in {elapsed:.2f}s"
    )
    emit(table(metrics))
    if metrics["rejected_orders"]:
        reasons = ", ".join(f"{r} {n:,}" for r, n in metrics["rejections"].items())
        emit(
            f"{metrics['rejected_orders']:,} orders rejected ({reasons}): the strategy asked"
            " for more than the cash, the position or the risk rules allowed"
        )
    emit(f"wrote {out}/{{{FILLS_CSV},{EQUITY_CSV},{METRICS_JSON},{REPORT_HTML}}}")
    return metrics


def strategies_help() -> str:
    return ", ".join(f"{n} ({s.help})" for n, s in sorted(STRATEGIES.items()))
