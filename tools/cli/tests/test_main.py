"""The ``gridstream`` parser: each command built only when it runs, the same as in full."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from gridstream.cli.main import COMMANDS, build_parser, command_of


def _commands(
    parser: argparse.ArgumentParser,
) -> argparse._SubParsersAction[argparse.ArgumentParser]:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def test_every_command_is_listed_with_the_help_its_own_parser_gives() -> None:
    listed = [(a.dest, a.help) for a in _commands(build_parser())._choices_actions]
    assert listed == list(COMMANDS.items())


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_the_lazy_parser_shows_and_parses_what_the_full_one_does(command: str | None) -> None:
    full = build_parser()
    lazy = build_parser(command, lazy=True)
    assert lazy.format_help() == full.format_help()
    if command is not None:
        own = _commands(lazy).choices[command]
        assert own.format_help() == _commands(full).choices[command].format_help()
        assert own.get_default("fn") is _commands(full).choices[command].get_default("fn")


def test_the_command_is_the_first_word_that_is_no_option() -> None:
    assert command_of(["backtest", "--strategy", "grid"]) == "backtest"
    assert command_of(["-h"]) is None
    assert command_of(["--help", "dlq", "list"]) == "dlq"
    assert command_of([]) is None


def _imported_by(argv: list[str], setup: str) -> set[str]:
    """The heavy modules a ``gridstream`` command line imports (its parser, then ``setup``)."""
    heavy = ("redis", "aiohttp", "asyncpg", "prometheus_client", "psutil", "polars", "numpy")
    code = (
        "import sys\n"
        "from gridstream.cli.main import build_parser, command_of\n"
        f"argv = {argv!r}\n"
        "build_parser(command_of(argv), lazy=True)\n"
        f"{setup}\n"
        f"print(__import__('json').dumps([m for m in {heavy!r} if m in sys.modules]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return set(json.loads(out.stdout))


def test_help_and_backtest_import_only_what_they_need() -> None:
    assert _imported_by(["--help"], "") == set()
    backtest = _imported_by(["backtest"], "import gridstream.cli.backtest")
    assert not backtest & {"redis", "asyncpg", "prometheus_client", "psutil"}
    assert {"polars", "numpy"} <= backtest
