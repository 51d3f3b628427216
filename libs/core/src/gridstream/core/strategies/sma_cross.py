"""``sma-cross``: the reference strategy, a long-only crossover of two SMAs of the close.

After a candle closes with the fast SMA above the slow one where, on the candle before,
it was below (strictly, both times), and nothing is held, it buys ``qty`` at the market:
the order fills at the next candle's open. After the fast SMA crosses below the slow one
while long, it sells the whole position the same way. This is backtesting.py's
``SmaCross`` example with ``trade_on_close`` off, long only; ``tests`` hold the two equal.

The SMAs are exact: running sums of the ``Decimal`` closes, compared without division.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING

import numpy as np

from gridstream.common.messages import (
    AnyMessage,
    Candle,
    OrderFailed,
    OrderFilled,
    OrderIntent,
    OrderRejected,
    OrderTypes,
    Side,
    deterministic_id,
)
from gridstream.core.portfolio import FillBook

if TYPE_CHECKING:
    from gridstream.core.backtest import Bars

NAME = "sma-cross"
ZERO = Decimal(0)
#: The decisions: the fast SMA crossed above (UP) or below (DOWN) the slow one.
UP = 1
DOWN = -1


@dataclass(frozen=True)
class SmaCrossParams:
    fast: int = 10
    slow: int = 30
    #: Base units bought on each entry.
    qty: Decimal = Decimal("0.001")
    #: The candle interval it trades (others are ignored).
    interval: str = "1m"

    def __post_init__(self) -> None:
        if self.fast < 1 or self.slow < 1:
            raise ValueError("fast and slow must be >= 1")
        if self.fast >= self.slow:
            raise ValueError("fast must be shorter than slow")
        if self.qty <= 0:
            raise ValueError("qty must be > 0")


@dataclass
class _SymbolState:
    closes: deque[Decimal]
    fast_sum: Decimal = ZERO
    slow_sum: Decimal = ZERO
    #: sign of (fast - slow) on the previous candle: -1, 0, 1, or None before both exist
    prev: int | None = None
    pending: str | None = None


class SmaCross:
    name = NAME
    wants_signals = False

    def __init__(self, params: SmaCrossParams | None = None) -> None:
        self.params = params or SmaCrossParams()
        self._state: dict[str, _SymbolState] = {}
        #: What it holds: the kernel's portfolio of its fills (each trade once; a fee in
        #: the base asset reduces the position).
        self.book = FillBook()

    def _st(self, symbol: str) -> _SymbolState:
        st = self._state.get(symbol)
        if st is None:
            st = self._state[symbol] = _SymbolState(closes=deque(maxlen=self.params.slow))
        return st

    def on_message(self, msg: AnyMessage) -> list[OrderIntent]:
        if isinstance(msg, Candle):
            return self.on_candle(msg)
        if isinstance(msg, OrderFilled):
            st = self._st(msg.symbol)
            self.book.on_fill(msg)
            if st.pending == msg.client_order_id:
                st.pending = None
        elif isinstance(msg, OrderRejected | OrderFailed):
            st = self._st(msg.symbol)
            if st.pending == msg.client_order_id:
                st.pending = None
        return []

    def on_candle(self, c: Candle) -> list[OrderIntent]:
        p = self.params
        if c.interval != p.interval:
            return []
        st = self._st(c.symbol)
        closes = st.closes
        n = len(closes)
        if n >= p.fast:
            st.fast_sum -= closes[n - p.fast]
        if n == p.slow:
            st.slow_sum -= closes[0]
        closes.append(c.close)
        st.fast_sum += c.close
        st.slow_sum += c.close
        if len(closes) < p.slow:
            return []
        # fast/p.fast vs slow/p.slow, without division
        diff = st.fast_sum * p.slow - st.slow_sum * p.fast
        sign = (diff > 0) - (diff < 0)
        prev, st.prev = st.prev, sign
        if prev is None:
            return []
        if prev < 0 < sign:
            return self.on_decision(c, UP)
        if prev > 0 > sign:
            return self.on_decision(c, DOWN)
        return []

    def on_decision(self, c: Candle, value: int) -> list[OrderIntent]:
        """At a cross (``UP``: fast above slow, ``DOWN``: below): buy when flat, sell the
        position when long, nothing while an order is still out."""
        st = self._st(c.symbol)
        if st.pending is not None:
            return []
        held = self.book.qty(c.symbol)
        if value == UP and held <= 0:
            return [self._order(c, "BUY", self.params.qty)]
        if value == DOWN and held > 0:
            return [self._order(c, "SELL", held)]
        return []

    def decision_bars(self, bars: Bars) -> np.ndarray:
        """``UP``/``DOWN`` at every bar whose close completes a cross, else 0: the same
        exact comparison as :meth:`on_candle`, over integer closes (``10**-8`` units)."""
        p = self.params
        c = np.asarray(bars.close_units, dtype=np.int64)
        out = np.zeros(len(c), dtype=np.int8)
        if len(c) <= p.slow or bars.interval != p.interval:
            return out
        fast = np.convolve(c, np.ones(p.fast, dtype=np.int64), mode="valid")[p.slow - p.fast :]
        slow = np.convolve(c, np.ones(p.slow, dtype=np.int64), mode="valid")
        sign = np.sign(fast * p.slow - slow * p.fast)  # sign[k]: bar slow - 1 + k
        up = (sign[:-1] < 0) & (sign[1:] > 0)
        down = (sign[:-1] > 0) & (sign[1:] < 0)
        out[p.slow :][up] = UP
        out[p.slow :][down] = DOWN
        return out

    def _order(self, c: Candle, side: Side, qty: Decimal) -> OrderIntent:
        coid = f"sx-{side[0].lower()}-{c.open_time}"
        self._st(c.symbol).pending = coid
        ts = (c.close_time + 1) * 1_000_000
        return OrderIntent(
            id=deterministic_id("intent", NAME, c.symbol, c.open_time, side),
            ts_event=ts,
            ts_init=ts,
            action="place",
            symbol=c.symbol,
            client_order_id=coid,
            side=side,
            price=c.close,
            qty=qty,
            strategy=NAME,
            reason="fast crossed above slow" if side == "BUY" else "fast crossed below slow",
            order_type=OrderTypes.MARKET,
        )
