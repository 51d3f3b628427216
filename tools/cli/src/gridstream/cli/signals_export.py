"""``gridstream signals export``: every indicator and the regime of a candle file.

Runs the signals service's batch path (Polars, :func:`gridstream.core.signals.frame.compute_frame`)
with the service's default parameters, overridable by the usual ``GS_*`` settings.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sg = sub.add_parser("signals", help="signals research tools")
    ssub = sg.add_subparsers(dest="signals_command", required=True)
    ex = ssub.add_parser(
        "export",
        help="write every indicator and the regime of a candle file (Parquet or CSV)",
        description=__doc__,
    )
    ex.add_argument("--candles", required=True, help="candle file: .csv, .csv.gz or .parquet")
    ex.add_argument("--out", required=True, help="output: .parquet or .csv")
    ex.set_defaults(fn=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from gridstream.common.settings import SettingsError, load_settings
    from gridstream.signals.export import export
    from gridstream.signals.main import SignalsSettings

    try:
        params = load_settings(SignalsSettings).params()
        rows = export(Path(args.candles), Path(args.out), params)
    except (SettingsError, ValueError, OSError) as exc:
        print(f"gridstream signals export: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {rows} rows to {args.out}")
    return 0
