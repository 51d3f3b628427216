"""The one small interface every strategy keeps, and the registry of strategies by name.

A strategy is fed every message the system sees for its symbols, in order (candles,
signals, risk's verdicts, the venue's executions) and answers each with the order intents
it wants (often none). It takes time only from the messages. The strategy service, the
backtester and replay drive it the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from decimal import Decimal, InvalidOperation
from typing import Any, Protocol, get_type_hints

from gridstream.common.binance.filters import SymbolFilters
from gridstream.common.messages import AnyMessage, OrderIntent


class Strategy(Protocol):
    """Events in, intents out."""

    #: The name intents carry (``OrderIntent.strategy``) and the registry knows it by.
    name: str
    #: True when the strategy decides on signals (the driver then runs the signal engine).
    wants_signals: bool

    def on_message(self, msg: AnyMessage) -> list[OrderIntent]: ...


class StrategySettingsError(ValueError):
    """A strategy setting is unknown or has a bad value; the message names it."""


@dataclass(frozen=True)
class StrategySpec:
    """How to build a strategy by name from text settings (``--set KEY=VALUE``)."""

    name: str
    params: type
    build: Callable[[Any], Strategy]
    help: str = ""

    def defaults(self) -> dict[str, Any]:
        obj = self.params()
        return {f.name: getattr(obj, f.name) for f in fields(obj)}

    def make(
        self, settings: Mapping[str, str], filters: Mapping[str, SymbolFilters] | None = None
    ) -> Strategy:
        """The strategy from text settings; a strategy that rounds to the venue's price
        tick and quantity step (``tick_sizes`` / ``step_sizes`` settings) takes them from
        ``filters`` unless its settings name them."""
        params = parse_params(self.params, settings, self.name)
        names = {f.name for f in fields(params)}
        if filters and {"tick_sizes", "step_sizes"} <= names:
            ticks = {s: f.tick_size for s, f in filters.items() if f.tick_size > 0}
            steps = {s: f.step_size for s, f in filters.items() if f.step_size > 0}
            params = replace(
                params,
                tick_sizes={**ticks, **params.tick_sizes},
                step_sizes={**steps, **params.step_sizes},
            )
        return self.build(params)


def parse_params(cls: type, settings: Mapping[str, str], owner: str) -> Any:
    """Build the dataclass ``cls`` from text values, naming any bad or unknown key."""
    hints = get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, text in settings.items():
        if key not in names:
            known = ", ".join(sorted(names))
            raise StrategySettingsError(f"{owner}: unknown setting {key!r} (known: {known})")
        tp = hints[key]
        try:
            if tp is int:
                kwargs[key] = int(text)
            elif tp is Decimal:
                kwargs[key] = Decimal(text)
            elif tp is float:
                kwargs[key] = float(text)
            elif tp is bool:
                if text.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(text)
                kwargs[key] = text.lower() in ("true", "1")
            else:
                kwargs[key] = text
        except (ValueError, InvalidOperation):
            raise StrategySettingsError(
                f"{owner}: {key}={text!r} is not a valid {getattr(tp, '__name__', tp)}"
            ) from None
    try:
        return cls(**kwargs)
    except ValueError as exc:
        raise StrategySettingsError(f"{owner}: {exc}") from None
