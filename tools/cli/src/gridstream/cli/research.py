"""``gridstream sweep`` and ``gridstream walkforward``: many backtests, every core.

    gridstream sweep --strategy NAME --candles PATH... --grid KEY=V1,V2,... [--grid ...]
        [--set KEY=VALUE]... [--config FILE.toml] [--cash 700] [--fee 0.001]
        [--slippage-bps 0] [--jobs N] [--sort METRIC] [--top N] [--out FILE.csv]

runs one backtest per combination of the ``--grid`` values (each over the same candles,
loaded once per worker process), on ``--jobs`` processes (default: every core), with a
progress bar, and prints the results sorted by ``--sort`` (default ``sharpe``; metrics
where lower is better, ``max_drawdown``, ``max_drawdown_duration_ms`` and ``fees``, sort
upward). ``--jobs 1`` runs every backtest in this one process.

    gridstream walkforward ... --train-days 14 --test-days 7 [--step-days 7]

rolls a window over the candles: on each fold it sweeps the grid over the training days,
takes the best combination by ``--sort``, runs it on the following test days, and shows
the in-sample and out-of-sample figures side by side. Each run starts flat and cold
(indicators warm up inside its window).
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import sys
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Final

from gridstream.core import performance
from gridstream.core.backtest import Bars, FillSettings
from gridstream.core.strategies import StrategySettingsError, make, with_interval

from .backtest import BacktestError, load_candles, simulate

DAY_MS: Final = 86_400_000
#: Metrics where a smaller value is the better one.
LOWER_IS_BETTER: Final = frozenset({"max_drawdown", "max_drawdown_duration_ms", "fees"})
#: Columns of the results table.
SHOWN: Final = ("total_return", "sharpe", "sortino", "max_drawdown", "win_rate", "round_trips")


def parse_grid(items: Sequence[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key.strip() or not vals:
            raise BacktestError(f"--grid {item!r}: expected KEY=V1,V2,...")
        out[key.strip()] = vals
    if not out:
        raise BacktestError("--grid: at least one KEY=V1,V2,...")
    return out


def combinations(grid: Mapping[str, list[str]]) -> list[dict[str, str]]:
    keys = list(grid)
    return [dict(zip(keys, vals, strict=True)) for vals in itertools.product(*grid.values())]


@dataclass(frozen=True)
class Job:
    strategy: str
    settings: dict[str, str]
    start_ms: int | None = None
    end_ms: int | None = None


_SERIES: dict[str, Bars] = {}
_FILL: FillSettings | None = None
_CASH = Decimal(0)


def _init(
    specs: Sequence[str], database_url: str | None, fill: FillSettings, cash: Decimal
) -> None:
    global _FILL, _CASH
    _SERIES.update(load_candles(specs, database_url))
    _FILL, _CASH = fill, cash


def _run(job: Job) -> dict[str, Any]:
    assert _FILL is not None
    series = _SERIES
    if job.start_ms is not None and job.end_ms is not None:
        series = {s: b.window(job.start_ms, job.end_ms) for s, b in _SERIES.items()}
        if any(len(b) == 0 for b in series.values()):
            return {"settings": job.settings, "error": "no candles in the window"}
    interval = next(iter(series.values())).interval
    try:
        strat = make(job.strategy, with_interval(job.strategy, job.settings, interval))
    except StrategySettingsError as exc:
        return {"settings": job.settings, "error": str(exc)}
    result = simulate(strat, series, _FILL, _CASH, progress=False)
    metrics = performance.compute(result)
    metrics.pop("buy_and_hold", None)
    metrics["settings"] = job.settings
    return metrics


def _key(metric: str) -> Any:
    sign = 1 if metric in LOWER_IS_BETTER else -1

    def key(row: Mapping[str, Any]) -> tuple[int, float]:
        value = row.get(metric)
        if not isinstance(value, int | float):
            return (1, 0.0)
        return (0, sign * float(value))

    return key


def run_jobs(
    jobs: Sequence[Job],
    specs: Sequence[str],
    *,
    database_url: str | None,
    fill: FillSettings,
    cash: Decimal,
    workers: int,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Every job on ``workers`` processes (in this one when ``workers == 1``), in order."""
    out: list[dict[str, Any] | None] = [None] * len(jobs)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), unit="run", file=sys.stderr, disable=None)
    try:
        if workers <= 1:
            _init(specs, database_url, fill, cash)
            for n, job in enumerate(jobs):
                out[n] = _run(job)
                if bar is not None:
                    bar.update(1)
        else:
            # spawn, not fork: the parent may hold polars' thread pool, which a forked
            # child would inherit mid-lock
            with ProcessPoolExecutor(
                max_workers=workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_init,
                initargs=(specs, database_url, fill, cash),
            ) as pool:
                futures = {pool.submit(_run, job): n for n, job in enumerate(jobs)}
                for fut in as_completed(futures):
                    out[futures[fut]] = fut.result()
                    if bar is not None:
                        bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return [r for r in out if r is not None]


def _fmt(key: str, v: Any) -> str:
    if not isinstance(v, int | float):
        return "-"
    if key in ("total_return", "max_drawdown", "win_rate"):
        return f"{v * 100:.2f}%"
    if isinstance(v, int):
        return f"{v:,}"
    return f"{v:.3f}"


def results_table(rows: Sequence[Mapping[str, Any]], keys: Sequence[str], top: int | None) -> str:
    shown = list(rows)[: top or None]
    header = [*keys, *SHOWN]
    body = [
        [str(r["settings"].get(k, "")) for k in keys]
        + ([r["error"]] if "error" in r else [_fmt(m, r.get(m)) for m in SHOWN])
        for r in shown
    ]
    widths = [
        max(len(h), *(len(row[i]) for row in body if i < len(row))) for i, h in enumerate(header)
    ]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True))]
    for row in body:
        lines.append("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=False)))
    return "\n".join(lines)


#: The figures a run can be ranked by.
SORTABLE: Final = frozenset({*performance.HEADLINE, "fills"})


def check_sort(sort: str) -> None:
    if sort not in SORTABLE:
        raise BacktestError(f"--sort {sort!r}: not a metric (one of {', '.join(sorted(SORTABLE))})")


def worker_count(jobs: int | None, runs: int) -> int:
    """``--jobs`` (default: every core), never more than there are runs."""
    if jobs is not None and jobs < 1:
        raise BacktestError(f"--jobs {jobs}: at least 1")
    return max(1, min(jobs or os.cpu_count() or 1, runs))


def sweep(
    *,
    strategy: str,
    candles: Sequence[str],
    grid: Sequence[str],
    sets: Mapping[str, str],
    fill: FillSettings,
    cash: Decimal,
    jobs: int | None,
    sort: str,
    database_url: str | None,
) -> list[dict[str, Any]]:
    check_sort(sort)
    combos = [{**sets, **c} for c in combinations(parse_grid(grid))]
    for c in combos:  # a bad setting is named before any process starts
        try:
            make(strategy, c)
        except StrategySettingsError as exc:
            raise BacktestError(str(exc)) from None
    workers = worker_count(jobs, len(combos))
    rows = run_jobs(
        [Job(strategy, c) for c in combos],
        candles,
        database_url=database_url,
        fill=fill,
        cash=cash,
        workers=workers,
    )
    return sorted(rows, key=_key(sort))


def folds(
    series: Mapping[str, Bars], train_ms: int, test_ms: int, step_ms: int
) -> list[tuple[int, int, int]]:
    """(train start, test start, test end) of each fold over the common span."""
    start = max(int(b.open_time[0]) for b in series.values())
    end = min(int(b.open_time[-1]) + b.interval_ms for b in series.values())
    out = []
    t = start
    while t + train_ms + test_ms <= end:
        out.append((t, t + train_ms, t + train_ms + test_ms))
        t += step_ms
    return out


def walkforward(
    *,
    strategy: str,
    candles: Sequence[str],
    grid: Sequence[str],
    sets: Mapping[str, str],
    fill: FillSettings,
    cash: Decimal,
    jobs: int | None,
    sort: str,
    train_days: float,
    test_days: float,
    step_days: float | None,
    database_url: str | None,
) -> list[dict[str, Any]]:
    check_sort(sort)
    combos = [{**sets, **c} for c in combinations(parse_grid(grid))]
    for c in combos:
        try:
            make(strategy, c)
        except StrategySettingsError as exc:
            raise BacktestError(str(exc)) from None
    series = load_candles(candles, database_url)
    train_ms, test_ms = int(train_days * DAY_MS), int(test_days * DAY_MS)
    step_ms = int((step_days or test_days) * DAY_MS)
    plan = folds(series, train_ms, test_ms, step_ms)
    if not plan:
        raise BacktestError("the candles are shorter than one training plus one test window")
    workers = worker_count(jobs, len(combos) * len(plan))
    train_jobs = [Job(strategy, c, a, b) for a, b, _e in plan for c in combos]
    trained = run_jobs(
        train_jobs, candles, database_url=database_url, fill=fill, cash=cash, workers=workers
    )
    best = []
    for n in range(len(plan)):
        rows = [r for r in trained[n * len(combos) : (n + 1) * len(combos)] if "error" not in r]
        best.append(sorted(rows, key=_key(sort))[0] if rows else None)
    test_jobs = [
        Job(strategy, b["settings"] if b else combos[0], plan[n][1], plan[n][2])
        for n, b in enumerate(best)
    ]
    tested = run_jobs(
        test_jobs,
        candles,
        database_url=database_url,
        fill=fill,
        cash=cash,
        workers=workers,
        progress=False,
    )
    out = []
    for n, (a, b, e) in enumerate(plan):
        out.append(
            {
                "fold": n + 1,
                "train_start_ms": a,
                "test_start_ms": b,
                "test_end_ms": e,
                "settings": (best[n] or {}).get("settings", {}),
                "in_sample": best[n] or {},
                "out_of_sample": tested[n],
            }
        )
    return out


def walkforward_table(rows: Sequence[Mapping[str, Any]], sort: str) -> str:
    from datetime import UTC, datetime

    def day(ms: int) -> str:
        return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d")

    lines = [
        f"{'fold':>4}  {'train from':>10}  {'test from':>10}  {'settings':<28}"
        f"  {'IS ' + sort:>12}  {'OOS ' + sort:>12}  {'IS return':>10}  {'OOS return':>10}"
    ]
    for r in rows:
        i, o = r["in_sample"], r["out_of_sample"]
        settings = ",".join(f"{k}={v}" for k, v in r["settings"].items())
        lines.append(
            f"{r['fold']:>4}  {day(r['train_start_ms']):>10}  {day(r['test_start_ms']):>10}"
            f"  {settings:<28}  {_fmt(sort, i.get(sort)):>12}  {_fmt(sort, o.get(sort)):>12}"
            f"  {_fmt('total_return', i.get('total_return')):>10}"
            f"  {_fmt('total_return', o.get('total_return')):>10}"
        )
    return "\n".join(lines)
