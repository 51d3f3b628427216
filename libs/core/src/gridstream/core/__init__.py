"""The gridstream kernel: every trading decision as a pure, synchronous engine.

Engines take events (messages) in and give decisions out; time comes only from the
messages. Nothing here talks to Redis, Postgres, HTTP, websockets or S3, or reads a clock
(``libs/core/tests/test_purity.py`` checks both). Services are wiring around these
engines, and ``gridstream backtest`` drives the very same ones.

- :mod:`gridstream.core.signals`: indicators, timeframes, regime (incremental engine and
  the Polars batch frame);
- :mod:`gridstream.core.strategies`: the dynamic grid;
- :mod:`gridstream.core.risk`: exchange filters and exposure rules;
- :mod:`gridstream.core.fills`: the fill model (when a limit order fills, at what price);
- :mod:`gridstream.core.portfolio`: balances, positions, average cost, PnL and equity, the
  one view of holdings of the backtester, risk, the strategy, the executor and status;
- :mod:`gridstream.core.orders`: the order state machine, the only code that decides an
  order's status (the executor and the backtester drive it).
"""
