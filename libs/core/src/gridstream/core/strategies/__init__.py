"""Strategies: events in, order intents out (:class:`~.base.Strategy`), by name."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from gridstream.common.binance.filters import SymbolFilters
from gridstream.core.strategies.base import Strategy, StrategySettingsError, StrategySpec
from gridstream.core.strategies.grid import STRATEGY_NAME as GRID
from gridstream.core.strategies.grid import GridEngine, GridParams
from gridstream.core.strategies.sma_cross import NAME as SMA_CROSS
from gridstream.core.strategies.sma_cross import SmaCross, SmaCrossParams

#: Every strategy by the name ``--strategy`` and ``OrderIntent.strategy`` know it by.
STRATEGIES: Final[dict[str, StrategySpec]] = {
    GRID: StrategySpec(
        GRID, GridParams, GridEngine, "the signal-driven dynamic grid (limit orders)"
    ),
    SMA_CROSS: StrategySpec(
        SMA_CROSS,
        SmaCrossParams,
        SmaCross,
        "reference: long-only crossover of two SMAs, market orders at the next open",
    ),
}


def make(
    name: str,
    settings: dict[str, str] | None = None,
    filters: Mapping[str, SymbolFilters] | None = None,
) -> Strategy:
    """Build a strategy by name from text settings (and the venue's ``filters``, for its
    tick and step sizes); the error names what is wrong."""
    spec = STRATEGIES.get(name)
    if spec is None:
        raise StrategySettingsError(
            f"unknown strategy {name!r} (known: {', '.join(sorted(STRATEGIES))})"
        )
    return spec.make(settings or {}, filters)


def with_interval(name: str, settings: Mapping[str, str], interval: str) -> dict[str, str]:
    """``settings`` for candles of ``interval``: a strategy with an ``interval`` setting
    trades the candles' interval unless the settings name one."""
    out = dict(settings)
    spec = STRATEGIES.get(name)
    if spec is not None and "interval" in spec.defaults() and "interval" not in out:
        out["interval"] = interval
    return out


__all__ = [
    "STRATEGIES",
    "Strategy",
    "StrategySettingsError",
    "StrategySpec",
    "make",
    "with_interval",
]
