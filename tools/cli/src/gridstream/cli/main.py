"""The ``gridstream`` command: status, tail, dlq, run, migrate, lockstep, ...

Each command imports what it needs when it runs, and only that: ``gridstream backtest``
loads no Redis, Postgres or HTTP client, ``gridstream tail`` no Polars (see
:func:`build_parser`).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar

if TYPE_CHECKING:
    from .supervise import BackoffPolicy

    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]

T = TypeVar("T")


def _write_line(data: bytes) -> None:
    sys.stdout.buffer.write(data + b"\n")
    sys.stdout.buffer.flush()


async def _with_redis(fn: Callable[..., Awaitable[T]], *args: object, **kw: object) -> T:
    from gridstream.common.runtime import redis_client

    from .common import redis_url

    redis = redis_client(redis_url())
    try:
        return await fn(redis, *args, **kw)
    finally:
        await redis.aclose()


def _decimal(text: str) -> Decimal:
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"{text!r}: not a number") from None
    if not value.is_finite():
        raise argparse.ArgumentTypeError(f"{text!r}: not a finite number")
    return value


def cmd_status(args: argparse.Namespace) -> int:
    import asyncio

    from . import status as status_mod
    from .common import database_url

    print(
        asyncio.run(
            _with_redis(
                status_mod.status,
                as_json=args.json,
                database_url=None if args.no_ledger else database_url(),
                cash=args.cash,
                cash_asset=args.cash_asset,
            )
        )
    )
    return 0


def _following(after: str) -> None:
    print(f"following new entries after {after}", file=sys.stderr, flush=True)


def cmd_tail(args: argparse.Namespace) -> int:
    import asyncio

    from . import tail as tail_mod

    try:
        asyncio.run(
            _with_redis(
                tail_mod.tail,
                args.stream,
                _write_line,
                from_id=args.from_id,
                last=args.last,
                follow=args.follow,
                following=_following,
            )
        )
    except KeyboardInterrupt:
        pass
    return 0


def cmd_dlq_list(args: argparse.Namespace) -> int:
    import asyncio

    from . import tail as tail_mod

    n = asyncio.run(_with_redis(tail_mod.dlq_list, args.group, _write_line))
    print(f"{n} dead letter(s) in group {args.group}", file=sys.stderr)
    return 0


def cmd_dlq_replay(args: argparse.Namespace) -> int:
    import asyncio

    from . import tail as tail_mod

    n = asyncio.run(_with_redis(tail_mod.dlq_replay, args.group, limit=args.limit))
    print(f"replayed {n} dead letter(s) of group {args.group} to their streams")
    return 0


def cmd_migrate(_: argparse.Namespace) -> int:
    import asyncio

    import asyncpg

    from gridstream.common import db

    from .common import database_url, ensure_database

    async def go() -> list[str]:
        url = database_url()
        await ensure_database(url)
        conn = await asyncpg.connect(url)
        try:
            return await db.migrate(conn)
        finally:
            await conn.close()

    applied = asyncio.run(go())
    print(f"applied: {', '.join(applied)}" if applied else "database is up to date")
    return 0


def _backoff(cap_s: float) -> BackoffPolicy:
    from .supervise import BackoffPolicy

    default = BackoffPolicy()
    if cap_s <= 0:
        raise SystemExit("gridstream run: --restart-cap must be > 0")
    return BackoffPolicy(initial_s=min(default.initial_s, cap_s), cap_s=cap_s)


def cmd_run(args: argparse.Namespace) -> int:
    from . import run as run_mod

    try:
        services, explicit = run_mod.parse_services(args.services)
    except ValueError as exc:
        print(f"gridstream run: {exc}", file=sys.stderr)
        return 2
    options = run_mod.RunOptions(
        services=services,
        explicit=explicit,
        exit_on_failure=args.exit_on_failure,
        metrics_base_port=args.metrics_base_port,
        sim_port=args.sim_port,
        data_dir=Path(args.data_dir),
        stop_timeout_s=args.stop_timeout,
        backoff=_backoff(args.restart_cap),
    )
    return run_mod.run(options)


#: Every command, in the order ``gridstream --help`` lists them, with the help it shows
#: there (a test holds these equal to each command's own parser).
COMMANDS: Final[dict[str, str]] = {
    "status": "streams, groups (lag, pending), dead letters, health",
    "tail": "decode a stream's entries, one JSON line each",
    "dlq": "dead letters of a consumer group",
    "run": "the whole stack as local processes (make run)",
    "migrate": "apply the Postgres migrations to DATABASE_URL",
    "backfill": "fill Postgres with closed candles from REST klines",
    "import": "load candle files (CSV, CSV.gz, zip, Parquet)",
    "lockstep": "drive a lockstep replay (GS_SIM_LOCKSTEP=true) of the running stack",
    "signals": "signals research tools",
    "backtest": "run a strategy of the kernel over candles (files or the candles table)",
    "sweep": "a backtest per combination of settings, on every core, ranked",
    "walkforward": "fit on one window, judge on the next, rolling",
    "config": "the effective settings (environment, secret files, defaults), masked",
}


def _add_status(sub: Subparsers) -> None:
    from . import status as status_mod

    st = sub.add_parser("status", help=COMMANDS["status"])
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.add_argument(
        "--cash",
        type=_decimal,
        metavar="AMOUNT",
        help="the account's quote balance before its first fill: shows balances and equity",
    )
    st.add_argument(
        "--cash-asset",
        default=status_mod.DEFAULT_CASH_ASSET,
        metavar="ASSET",
        help="the asset of --cash when the ledger has several quote assets (default USDT)",
    )
    st.add_argument(
        "--no-ledger", action="store_true", help="leave out the portfolio (no Postgres)"
    )
    st.set_defaults(fn=cmd_status)


def _add_tail(sub: Subparsers) -> None:
    tl = sub.add_parser("tail", help=COMMANDS["tail"])
    tl.add_argument("stream", help="e.g. gs:candles:BTCUSDT or gs:dlq:risk")
    where = tl.add_mutually_exclusive_group()
    where.add_argument("--from", dest="from_id", metavar="ID", help="start at this entry id")
    where.add_argument("--last", type=int, metavar="N", help="the last N entries (default 10)")
    tl.add_argument("--follow", "-f", action="store_true", help="keep printing new entries")
    tl.set_defaults(fn=cmd_tail)


def _add_dlq(sub: Subparsers) -> None:
    dq = sub.add_parser("dlq", help=COMMANDS["dlq"])
    dsub = dq.add_subparsers(dest="dlq_command", required=True)
    dl = dsub.add_parser("list", help="show the dead letters with their reasons")
    dl.add_argument("group")
    dl.set_defaults(fn=cmd_dlq_list)
    dr = dsub.add_parser("replay", help="move the dead letters back to their source streams")
    dr.add_argument("group")
    dr.add_argument("--limit", type=int, default=1000)
    dr.set_defaults(fn=cmd_dlq_replay)


def _add_run(sub: Subparsers) -> None:
    from . import run as run_mod
    from .supervise import BackoffPolicy

    rn = sub.add_parser(
        "run",
        help=COMMANDS["run"],
        description=run_mod.__doc__,
        epilog=run_mod.ENV_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    rn.add_argument("--services", metavar="A,B", help="run only these (default: all)")
    rn.add_argument(
        "--exit-on-failure",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="stop everything when one child dies, for CI (default: restart it, with backoff)",
    )
    rn.add_argument(
        "--restart-cap",
        type=float,
        default=BackoffPolicy().cap_s,
        metavar="S",
        help="longest wait before a restart, in seconds (default %(default)s)",
    )
    rn.add_argument("--metrics-base-port", type=int, default=run_mod.DEFAULT_METRICS_BASE)
    rn.add_argument(
        "--sim-port",
        type=int,
        default=int(os.environ.get("GS_SIM_PORT") or run_mod.DEFAULT_SIM_PORT),
    )
    rn.add_argument("--data-dir", default=".data", help="embedded servers' data (default .data)")
    rn.add_argument(
        "--stop-timeout", type=float, default=10.0, help="seconds between SIGTERM and SIGKILL"
    )
    rn.set_defaults(fn=cmd_run)


def _add_migrate(sub: Subparsers) -> None:
    mg = sub.add_parser("migrate", help=COMMANDS["migrate"])
    mg.set_defaults(fn=cmd_migrate)


def _add_history(sub: Subparsers) -> None:
    from . import history

    history.add_parsers(sub)


def _add_lockstep(sub: Subparsers) -> None:
    from . import lockstep

    lockstep.add_parser(sub)


def _add_signals(sub: Subparsers) -> None:
    from . import signals_export

    signals_export.add_parser(sub)


def _add_config(sub: Subparsers) -> None:
    from .run import ALL

    cf = sub.add_parser("config", help=COMMANDS["config"])
    cf.add_argument("--service", choices=sorted({*ALL}), help="only this service's")
    cf.add_argument("--json", action="store_true", help="machine-readable output")
    cf.set_defaults(fn=cmd_config)


def _groups() -> tuple[tuple[Callable[[Subparsers], None], tuple[str, ...]], ...]:
    """Who adds each command's parser: (the function, the commands it adds, in order)."""
    return (
        (_add_status, ("status",)),
        (_add_tail, ("tail",)),
        (_add_dlq, ("dlq",)),
        (_add_run, ("run",)),
        (_add_migrate, ("migrate",)),
        (_add_history, ("backfill", "import")),
        (_add_lockstep, ("lockstep",)),
        (_add_signals, ("signals",)),
        (add_backtest_parser, ("backtest",)),
        (add_research_parsers, ("sweep", "walkforward")),
        (_add_config, ("config",)),
    )


def build_parser(command: str | None = None, *, lazy: bool = False) -> argparse.ArgumentParser:
    """The ``gridstream`` parser, every command complete; with ``lazy``, only ``command``
    (None: none) gets its own arguments, and so imports its module and what that needs,
    while every other command is listed with its help alone (all ``gridstream --help``
    shows of it)."""
    p = argparse.ArgumentParser(
        prog="gridstream", description="gridstream: run the stack and look inside its streams"
    )
    sub = p.add_subparsers(dest="command", required=True)
    for add, names in _groups():
        if not lazy or command in names:
            add(sub)
        else:
            for name in names:
                sub.add_parser(name, help=COMMANDS[name])
    return p


def command_of(argv: Sequence[str]) -> str | None:
    """The command an argument list runs: its first word that is no option."""
    return next((a for a in argv if not a.startswith("-")), None)


def _research_common(p: argparse.ArgumentParser) -> None:
    from gridstream.core.strategies import STRATEGIES

    p.add_argument("--strategy", required=True, choices=sorted(STRATEGIES))
    p.add_argument("--candles", required=True, nargs="+", metavar="PATH")
    p.add_argument(
        "--grid", action="append", required=True, metavar="KEY=V1,V2", help="values to try"
    )
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="a fixed setting")
    p.add_argument("--config", metavar="FILE.toml")
    p.add_argument("--cash")
    p.add_argument("--fee")
    p.add_argument("--slippage-bps")
    p.add_argument("--jobs", type=int, help="worker processes (default: every core)")
    p.add_argument("--sort", default="sharpe", help="the metric to rank by (default sharpe)")


def add_research_parsers(sub: Subparsers) -> None:
    from . import research

    sw = sub.add_parser(
        "sweep",
        help=COMMANDS["sweep"],
        description=research.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _research_common(sw)
    sw.add_argument("--top", type=int, help="show only the best N")
    sw.add_argument("--out", metavar="FILE.csv", help="write every result")
    sw.set_defaults(fn=cmd_sweep)
    wf = sub.add_parser(
        "walkforward",
        help=COMMANDS["walkforward"],
        description=research.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _research_common(wf)
    wf.add_argument("--train-days", type=float, required=True)
    wf.add_argument("--test-days", type=float, required=True)
    wf.add_argument("--step-days", type=float, help="default: --test-days")
    wf.set_defaults(fn=cmd_walkforward)


def _research_inputs(args: argparse.Namespace) -> dict[str, Any]:
    from decimal import Decimal, InvalidOperation

    from . import backtest as backtest_mod

    cfg = backtest_mod.read_config(args.config)
    sets = {k: str(v) for k, v in cfg.get("strategy", {}).items()}
    sets.update(backtest_mod.parse_sets(args.set or []))
    fill = backtest_mod.fill_settings(cfg.get("fill", {}), args.fee, args.slippage_bps)
    cash_text = args.cash or str(cfg.get("backtest", {}).get("cash", "700"))
    try:
        cash = Decimal(cash_text)
    except InvalidOperation:
        raise backtest_mod.BacktestError(f"--cash {cash_text!r}: not a number") from None
    return {
        "strategy": args.strategy,
        "candles": args.candles,
        "grid": args.grid,
        "sets": sets,
        "fill": fill,
        "cash": cash,
        "jobs": args.jobs,
        "sort": args.sort,
        "database_url": os.environ.get("DATABASE_URL"),
    }


def cmd_sweep(args: argparse.Namespace) -> int:
    import csv

    from . import backtest as backtest_mod
    from . import research

    try:
        rows = research.sweep(**_research_inputs(args))
    except backtest_mod.BacktestError as exc:
        print(f"gridstream sweep: {exc}", file=sys.stderr)
        return 2
    keys = list(research.parse_grid(args.grid))
    print(research.results_table(rows, keys, args.top))
    if args.out:
        names = sorted({k for r in rows for k, v in r.items() if not isinstance(v, dict)})
        with open(args.out, "w", newline="") as fh:
            w = csv.writer(fh, lineterminator="\n")
            w.writerow([*keys, *names])
            for r in rows:
                w.writerow([r["settings"].get(k, "") for k in keys] + [r.get(n, "") for n in names])
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


def cmd_walkforward(args: argparse.Namespace) -> int:
    from . import backtest as backtest_mod
    from . import research

    try:
        rows = research.walkforward(
            **_research_inputs(args),
            train_days=args.train_days,
            test_days=args.test_days,
            step_days=args.step_days,
        )
    except backtest_mod.BacktestError as exc:
        print(f"gridstream walkforward: {exc}", file=sys.stderr)
        return 2
    print(research.walkforward_table(rows, args.sort))
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from . import config as config_mod

    text, code = config_mod.config(args.service, args.json)
    print(text)
    return code


def cmd_backtest(args: argparse.Namespace) -> int:
    from . import backtest as backtest_mod

    try:
        backtest_mod.run(
            strategy=args.strategy,
            candles=args.candles,
            out=Path(args.out),
            sets=args.set or [],
            config=args.config,
            cash=args.cash,
            fee=args.fee,
            slippage_bps=args.slippage_bps,
            database_url=os.environ.get("DATABASE_URL"),
            exchange_info=args.exchange_info,
            max_exposure=args.max_exposure,
        )
    except backtest_mod.BacktestError as exc:
        print(f"gridstream backtest: {exc}", file=sys.stderr)
        return 2
    return 0


def add_backtest_parser(sub: Subparsers) -> None:
    from gridstream.core.strategies import STRATEGIES

    bt = sub.add_parser(
        "backtest",
        help=COMMANDS["backtest"],
        description="Run a strategy of the trading kernel over candles; writes fills.csv, "
        "equity.csv, metrics.json and report.html to --out. Strategies: "
        + "; ".join(f"{n}: {s.help}" for n, s in sorted(STRATEGIES.items())),
    )
    bt.add_argument("--strategy", required=True, choices=sorted(STRATEGIES))
    bt.add_argument(
        "--candles",
        required=True,
        nargs="+",
        metavar="PATH",
        help="CSV/Parquet files (symbol from the file name or a column), or db:SYM,SYM[@1m]",
    )
    bt.add_argument("--out", required=True, metavar="DIR")
    bt.add_argument("--set", action="append", metavar="KEY=VALUE", help="a strategy setting")
    bt.add_argument("--config", metavar="FILE.toml", help="[strategy], [fill], [backtest]")
    bt.add_argument("--cash", help="starting quote balance (default 700)")
    bt.add_argument("--fee", help="maker and taker fee, a fraction (default 0.001)")
    bt.add_argument("--slippage-bps", help="market orders fill this much worse (default 0)")
    bt.add_argument(
        "--exchange-info",
        metavar="FILE.json",
        help="a saved GET /api/v3/exchangeInfo: the venue's filters, for the strategy's tick"
        " and step and for the risk engine (which then judges every intent)",
    )
    bt.add_argument(
        "--max-exposure",
        metavar="QUOTE",
        help="run the risk engine with this GS_MAX_EXPOSURE_QUOTE (default with"
        " --exchange-info or [risk]: the risk service's, 250)",
    )
    bt.set_defaults(fn=cmd_backtest)


def main(argv: list[str] | None = None) -> None:
    words = sys.argv[1:] if argv is None else argv
    args = build_parser(command_of(words), lazy=True).parse_args(words)
    raise SystemExit(args.fn(args))


if __name__ == "__main__":
    main()
