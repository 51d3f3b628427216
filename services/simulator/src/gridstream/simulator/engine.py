"""The simulator's pure, synchronous engine: replay schedule, matching, balances.

No I/O and no clock reads: the wiring calls :meth:`Engine.step` to advance the
replay clock to the next scheduled timestamp and gets back the market and user
events to publish; REST handlers call the order/account methods, which use the
replay clock (``clock_ms``) as transaction time. See ``data.py`` for the trade
path synthesised inside each candle, and ``gridstream.core.fills`` for the
fill decision shared with paper trading and the backtester.

Event order within one candle of one symbol: the ``n`` trades (each followed by
the matching of resting orders against it), one forming-candle ``kline`` frame
with ``x: false`` right after trade ``n // 2 - 1``, then the closed ``kline``
frame (``x: true``) at the candle's close time ``open + 59999``.
"""

from __future__ import annotations

import heapq
import secrets
import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import ROUND_DOWN, Decimal
from functools import lru_cache
from typing import Any, cast

from gridstream.core import fills as fill_rules
from gridstream.core.fills import FillDecision, Side

from .data import (
    INTERVAL_NAMES,
    INTERVALS_MS,
    MINUTE_MS,
    Q8,
    Candle,
    CandleSeries,
    SynthTrade,
    synth_trades,
)
from .symbols import SymbolSpec

ZERO = Decimal(0)
__all__ = ["INTERVALS_MS", "ApiError", "Engine", "Event", "MarketEvent", "UserEvent"]


def fmt(d: Decimal) -> str:
    """Binance's 8-decimal string encoding."""
    return f"{d.quantize(Q8):f}"


class ApiError(Exception):
    """A Binance error response: ``{"code": code, "msg": msg}`` with ``status``."""

    def __init__(self, code: int, msg: str, status: int = 400) -> None:
        super().__init__(f"{code} {msg}")
        self.code = code
        self.msg = msg
        self.status = status


def missing(name: str) -> ApiError:
    return ApiError(
        -1102, f"Mandatory parameter '{name}' was not sent, was empty/null, or malformed."
    )


@dataclass(frozen=True, slots=True)
class MarketEvent:
    """A market-data websocket payload for stream ``stream`` (e.g. ``btcusdt@trade``)."""

    stream: str
    payload: dict[str, Any]


@dataclass(frozen=True, slots=True)
class UserEvent:
    """A user-data-stream payload (``executionReport``, ``outboundAccountPosition``)."""

    payload: dict[str, Any]


Event = MarketEvent | UserEvent


@dataclass(slots=True)
class Fill:
    symbol: str
    trade_id: int
    order_id: int
    client_order_id: str
    side: str
    price: Decimal
    qty: Decimal
    commission: Decimal
    commission_asset: str
    is_maker: bool
    time: int

    def my_trade(self) -> dict[str, Any]:
        return {
            "symbol": self.symbol,
            "id": self.trade_id,
            "orderId": self.order_id,
            "orderListId": -1,
            "price": fmt(self.price),
            "qty": fmt(self.qty),
            "quoteQty": fmt(self.price * self.qty),
            "commission": fmt(self.commission),
            "commissionAsset": self.commission_asset,
            "time": self.time,
            "isBuyer": self.side == "BUY",
            "isMaker": self.is_maker,
            "isBestMatch": True,
        }

    def admin(self) -> dict[str, Any]:
        return {
            "symbol": self.symbol,
            "orderId": self.order_id,
            "clientOrderId": self.client_order_id,
            "tradeId": self.trade_id,
            "side": self.side,
            "price": fmt(self.price),
            "qty": fmt(self.qty),
            "commission": fmt(self.commission),
            "commissionAsset": self.commission_asset,
            "isMaker": self.is_maker,
            "time": self.time,
        }


@dataclass(slots=True)
class Order:
    symbol: str
    order_id: int
    client_order_id: str
    side: str
    type: str
    tif: str
    price: Decimal
    orig_qty: Decimal
    time: int
    status: str = "NEW"
    executed_qty: Decimal = ZERO
    cum_quote: Decimal = ZERO
    update_time: int = 0
    lock_asset: str = ""
    lock_per_unit: Decimal = ZERO  # locked amount per unit of remaining qty
    fills: list[Fill] = field(default_factory=list)

    @property
    def remaining(self) -> Decimal:
        return self.orig_qty - self.executed_qty

    @property
    def is_open(self) -> bool:
        return self.status in ("NEW", "PARTIALLY_FILLED")

    def base_view(self) -> dict[str, Any]:
        return {
            "symbol": self.symbol,
            "orderId": self.order_id,
            "orderListId": -1,
            "clientOrderId": self.client_order_id,
        }

    def result_fields(self) -> dict[str, Any]:
        return {
            "price": fmt(self.price),
            "origQty": fmt(self.orig_qty),
            "executedQty": fmt(self.executed_qty),
            "origQuoteOrderQty": fmt(ZERO),
            "cummulativeQuoteQty": fmt(self.cum_quote),
            "status": self.status,
            "timeInForce": self.tif,
            "type": self.type,
            "side": self.side,
        }

    def query_view(self) -> dict[str, Any]:
        d = self.base_view()
        d.update(self.result_fields())
        d.update(
            {
                "stopPrice": fmt(ZERO),
                "icebergQty": fmt(ZERO),
                "time": self.time,
                "updateTime": self.update_time,
                "isWorking": True,
                "workingTime": self.time,
                "selfTradePreventionMode": "NONE",
            }
        )
        return d


def _rand_id() -> str:
    alphabet = string.ascii_letters + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(22))


@dataclass(order=True, slots=True)
class _Sched:
    time: int
    rank: int  # symbol index
    seq: int
    kind: str = field(compare=False)
    symbol: str = field(compare=False)
    candle: Candle = field(compare=False)
    trade_index: int = field(compare=False)


class Engine:
    """Replay clock, matching and account of one simulated Binance spot account."""

    def __init__(
        self,
        *,
        series: Mapping[str, CandleSeries],
        specs: Mapping[str, SymbolSpec],
        window_start: int,
        window_end: int,
        trades_per_candle: int,
        balances: Mapping[str, Decimal],
        maker_fee: Decimal,
        taker_fee: Decimal,
        rest_forming_kline: bool = False,
    ) -> None:
        self.series = dict(series)
        self.symbols = list(series)
        self.specs = {s: specs[s] for s in self.symbols}
        self.window_start = window_start
        self.window_end = window_end
        self.n = trades_per_candle
        self.maker_fee = maker_fee
        self.taker_fee = taker_fee
        self.rest_forming_kline = rest_forming_kline
        self.clock_ms = window_start - 1
        self.free: dict[str, Decimal] = {}
        self.locked: dict[str, Decimal] = {}
        for sp in self.specs.values():
            for a in (sp.base, sp.quote):
                self.free.setdefault(a, ZERO)
                self.locked.setdefault(a, ZERO)
        for a, v in balances.items():
            self.free[a] = v
            self.locked.setdefault(a, ZERO)
        self.orders: dict[int, Order] = {}
        self.fills: list[Fill] = []
        self.next_order_id = 1
        # real tapes keep their ids; our own fills (taker) are numbered after the file's
        self.next_trade_id = {s: self.series[s].max_trade_id + 1 for s in self.symbols}
        self.last_price: dict[str, Decimal] = {}
        self.market_trades = 0
        self.account_update_time = 0
        self._sched: list[_Sched] = []
        self._seq = 0
        self._next_minute = window_start - window_start % MINUTE_MS
        if self._next_minute < window_start:
            self._next_minute += MINUTE_MS
        self._forming: dict[str, list[tuple[int, SynthTrade]]] = {s: [] for s in self.symbols}
        for s in self.symbols:
            ser = self.series[s]
            i = ser.index_at_or_after(window_start)
            if i < len(ser.candles):
                self.last_price[s] = ser.candles[i].open
            elif ser.candles:
                self.last_price[s] = ser.candles[-1].close
        self.rejected_reports: list[UserEvent] = []
        #: Closed candles published per symbol.
        self.closed_candles: dict[str, int] = dict.fromkeys(self.symbols, 0)
        self._trades_cache = lru_cache(maxsize=4096)(self._trades_uncached)

    # ------------------------------------------------------------------ replay
    def _trades_uncached(self, symbol: str, open_time: int) -> tuple[SynthTrade, ...]:
        ser = self.series[symbol]
        if ser.prints is not None:
            return ser.prints.get(open_time, ())
        c = ser.get(open_time)
        if c is None:
            return ()
        return tuple(synth_trades(c, self.n, self.specs[symbol].tick))

    def trades_of(self, symbol: str, candle: Candle) -> tuple[SynthTrade, ...]:
        return self._trades_cache(symbol, candle.open_time)

    def _fill_schedule(self) -> None:
        while not self._sched and self._next_minute < self.window_end:
            t = self._next_minute
            self._next_minute += MINUTE_MS
            for rank, s in enumerate(self.symbols):
                c = self.series[s].get(t)
                if c is None:
                    continue
                trades = self.trades_of(s, c)
                mid = max(len(trades) // 2 - 1, 0)
                for i, tr in enumerate(trades):
                    self._push(tr.time, rank, "trade", s, c, i)
                    if i == mid:
                        self._push(tr.time, rank, "kline_open", s, c, i)
                self._push(c.close_time, rank, "kline_closed", s, c, len(trades) - 1)

    def _push(self, t: int, rank: int, kind: str, s: str, c: Candle, i: int) -> None:
        self._seq += 1
        heapq.heappush(self._sched, _Sched(t, rank, self._seq, kind, s, c, i))

    @property
    def done(self) -> bool:
        self._fill_schedule()
        return not self._sched

    def peek_time(self) -> int | None:
        """Event time of the next scheduled step, or ``None`` when the window is over."""
        self._fill_schedule()
        return self._sched[0].time if self._sched else None

    def closes_next(self) -> bool:
        """True when the next step publishes closed candles (every trade of their minute
        has been printed)."""
        self._fill_schedule()
        if not self._sched:
            return False
        t = self._sched[0].time
        return any(it.time == t and it.kind == "kline_closed" for it in self._sched)

    def step(self) -> list[Event]:
        """Process every scheduled item at the next timestamp; return what to publish."""
        t = self.peek_time()
        if t is None:
            return []
        out: list[Event] = []
        while self._sched and self._sched[0].time == t:
            it = heapq.heappop(self._sched)
            self.clock_ms = max(self.clock_ms, t)
            if it.kind == "trade":
                out.extend(self._on_trade(it.symbol, it.candle, it.trade_index))
            else:
                closed = it.kind == "kline_closed"
                out.append(self._kline_event(it.symbol, it.candle, closed, t))
                if closed:
                    self._forming[it.symbol] = []
                    self.closed_candles[it.symbol] += 1
        if self.done:
            self.clock_ms = max(self.clock_ms, self.window_end - 1)
        return out

    def _on_trade(self, symbol: str, candle: Candle, idx: int) -> list[Event]:
        tr = self.trades_of(symbol, candle)[idx]
        if tr.trade_id is not None:
            tid = tr.trade_id
            agg, first, last = tr.agg_id or tid, tr.first_id or tid, tr.last_id or tid
        else:
            tid = self.next_trade_id[symbol]
            self.next_trade_id[symbol] = tid + 1
            agg = first = last = tid
        self.market_trades += 1
        self._forming[symbol].append((tid, tr))
        self.last_price[symbol] = tr.price
        low = symbol.lower()
        p, q = fmt(tr.price), fmt(tr.qty)
        out: list[Event] = [
            MarketEvent(
                f"{low}@trade",
                {
                    "e": "trade",
                    "E": tr.time,
                    "s": symbol,
                    "t": tid,
                    "p": p,
                    "q": q,
                    "T": tr.time,
                    "m": tr.buyer_maker,
                    "M": True,
                },
            ),
            MarketEvent(
                f"{low}@aggTrade",
                {
                    "e": "aggTrade",
                    "E": tr.time,
                    "s": symbol,
                    "a": agg,
                    "p": p,
                    "q": q,
                    "f": first,
                    "l": last,
                    "T": tr.time,
                    "m": tr.buyer_maker,
                    "M": True,
                },
            ),
        ]
        out.extend(self._match(symbol, tr, tid))
        return out

    def _kline_event(self, symbol: str, c: Candle, closed: bool, t: int) -> MarketEvent:
        done = self._forming[symbol]
        trades = [tr for _, tr in done]
        o, h, lo, cl, v, q, tb, tq = _ohlcv(trades)
        n = sum(tr.count for tr in trades)
        if closed or not trades:
            # the candle itself (equal to the trades for synthetic and real tapes; a
            # minute without trades is flat at the previous close)
            o, h, lo, cl, v = c.open, c.high, c.low, c.close, c.volume
        if closed and c.has_stats:
            q, tb, tq = c.quote_volume or ZERO, c.taker_base or ZERO, c.taker_quote or ZERO
            n = c.count or 0
        first = done[0][1].first_id if done and done[0][1].first_id is not None else None
        last = done[-1][1].last_id if done and done[-1][1].last_id is not None else None
        iname = INTERVAL_NAMES[c.interval_ms]
        k = {
            "t": c.open_time,
            "T": c.close_time,
            "s": symbol,
            "i": iname,
            "f": first if first is not None else (done[0][0] if done else -1),
            "L": last if last is not None else (done[-1][0] if done else -1),
            "o": fmt(o),
            "c": fmt(cl),
            "h": fmt(h),
            "l": fmt(lo),
            "v": fmt(v),
            "n": n,
            "x": closed,
            "q": fmt(q),
            "V": fmt(tb),
            "Q": fmt(tq),
            "B": "0",
        }
        return MarketEvent(
            f"{symbol.lower()}@kline_{iname}", {"e": "kline", "E": t, "s": symbol, "k": k}
        )

    # ---------------------------------------------------------------- klines
    def kline_row(self, symbol: str, candles: list[Candle], interval_ms: int) -> list[Any]:
        """One REST row for the closed bucket made of ``candles``.

        O/H/L/C/V come from the candles (the trades reproduce them exactly). Quote volume,
        trade count and taker-buy volumes come from the source when it has them (a
        Binance kline file, candles built from real trades), else from the synthetic
        trades."""
        first = candles[0]
        o, cl = first.open, candles[-1].close
        h = max(c.high for c in candles)
        lo = min(c.low for c in candles)
        v = sum((c.volume for c in candles), ZERO)
        q = tb = tq = ZERO
        n = 0
        for c in candles:
            if c.has_stats:
                q += c.quote_volume or ZERO
                tb += c.taker_base or ZERO
                tq += c.taker_quote or ZERO
                n += c.count or 0
            else:
                trades = list(self.trades_of(symbol, c))
                _, _, _, _, _, cq, ctb, ctq = _ohlcv(trades)
                q, tb, tq, n = q + cq, tb + ctb, tq + ctq, n + len(trades)
        bucket = first.open_time - first.open_time % interval_ms
        return _row(bucket, interval_ms, o, h, lo, cl, v, q, n, tb, tq)

    def forming_row(self, symbol: str, interval_ms: int) -> list[Any] | None:
        """The bucket that contains the replay clock, from what has been replayed so far
        (``None`` when the clock is on a bucket's last millisecond, or nothing printed)."""
        clock = self.clock_ms
        b = clock - clock % interval_ms
        if b + interval_ms - 1 <= clock or clock < self.window_start:
            return None
        ser = self.series[symbol]
        i = ser.index_at_or_after(b)
        trades: list[SynthTrade] = []
        while i < len(ser.candles) and ser.candles[i].open_time <= clock:
            trades.extend(t for t in self.trades_of(symbol, ser.candles[i]) if t.time <= clock)
            i += 1
        if not trades:
            return None
        o, h, lo, cl, v, q, tb, tq = _ohlcv(trades)
        n = sum(t.count for t in trades)
        return _row(b, interval_ms, o, h, lo, cl, v, q, n, tb, tq)

    def check_interval(self, symbol: str, interval: str) -> int:
        """Interval in ms; -1120 unless it is a whole multiple of the replayed candles'."""
        ims = INTERVALS_MS.get(interval)
        base = self.series[symbol].interval_ms
        if ims is None or ims % base:
            raise ApiError(-1120, "Invalid interval.")
        return ims

    def klines(
        self,
        symbol: str,
        interval: str,
        start: int | None,
        end: int | None,
        limit: int,
    ) -> list[list[Any]]:
        """Klines paged like Binance, never past the replay clock.

        ``startTime``/``endTime`` are inclusive bounds on the open time; with
        ``startTime`` the first ``limit`` rows from there, otherwise the last ``limit``
        rows up to ``endTime`` (or now). Only closed buckets (close time <= replay clock),
        plus, with ``rest_forming_kline``, the bucket forming at the replay clock built
        from the trades replayed so far (real Binance returns it as the last row).
        """
        ims = self.check_interval(symbol, interval)
        ser = self.series[symbol]
        clock = self.clock_ms
        forming = self.forming_row(symbol, ims) if self.rest_forming_kline else None
        if forming is not None and (
            (start is not None and forming[0] < start) or (end is not None and forming[0] > end)
        ):
            forming = None
        if start is not None:
            i = ser.index_at_or_after(start - start % ims)
            rows: list[list[Any]] = []
            while i < len(ser.candles) and len(rows) < limit:
                b = ser.candles[i].open_time - ser.candles[i].open_time % ims
                group, i = self._bucket(ser, i, b, ims)
                if b + ims - 1 > clock or (end is not None and b > end):
                    break
                if b >= start:
                    rows.append(self.kline_row(symbol, group, ims))
            if forming is not None and len(rows) < limit:
                rows.append(forming)
            return rows
        top = clock if end is None else min(clock, end + ims)
        j = ser.index_at_or_after(top + 1) - 1
        rev: list[list[Candle]] = []
        want = limit - (1 if forming is not None else 0)
        while j >= 0 and len(rev) < want:
            b = ser.candles[j].open_time - ser.candles[j].open_time % ims
            k = j
            while k - 1 >= 0 and ser.candles[k - 1].open_time >= b:
                k -= 1
            group = ser.candles[k : j + 1]
            j = k - 1
            if b + ims - 1 > clock or (end is not None and b > end):
                continue
            rev.append(group)
        out = [self.kline_row(symbol, g, ims) for g in reversed(rev)]
        if forming is not None:
            out.append(forming)
        return out

    @staticmethod
    def _bucket(ser: CandleSeries, i: int, b: int, ims: int) -> tuple[list[Candle], int]:
        group: list[Candle] = []
        while i < len(ser.candles) and ser.candles[i].open_time < b + ims:
            group.append(ser.candles[i])
            i += 1
        return group, i

    # ---------------------------------------------------------------- orders
    def _spec(self, params: Mapping[str, str]) -> SymbolSpec:
        sym = params.get("symbol", "")
        if not sym:
            raise missing("symbol")
        spec = self.specs.get(sym.upper())
        if spec is None:
            raise ApiError(-1121, "Invalid symbol.")
        return spec

    @staticmethod
    def _dec(params: Mapping[str, str], name: str) -> Decimal | None:
        raw = params.get(name)
        if raw is None or raw == "":
            return None
        try:
            d = Decimal(raw)
        except ArithmeticError as exc:
            raise ApiError(-1100, f"Illegal characters found in parameter '{name}'.") from exc
        if not d.is_finite() or d < 0:
            raise ApiError(-1100, f"Illegal characters found in parameter '{name}'.")
        return d

    def place_order(self, params: Mapping[str, str]) -> tuple[dict[str, Any], list[Event]]:
        spec = self._spec(params)
        side = params.get("side", "")
        if not side:
            raise missing("side")
        if side not in ("BUY", "SELL"):
            raise ApiError(-1117, "Invalid side.")
        otype = params.get("type", "")
        if not otype:
            raise missing("type")
        if otype not in ("LIMIT", "LIMIT_MAKER", "MARKET"):
            raise ApiError(-1116, "Invalid orderType.")
        tif = params.get("timeInForce", "")
        if otype == "LIMIT":
            if not tif:
                raise missing("timeInForce")
            if tif not in ("GTC", "IOC", "FOK"):
                raise ApiError(-1115, "Invalid timeInForce.")
        elif tif:
            raise ApiError(-1106, "Parameter 'timeInForce' sent when not required.")
        tif = tif or "GTC"
        price = self._dec(params, "price")
        qty = self._dec(params, "quantity")
        last = self.last_price.get(spec.symbol)
        if last is None:
            raise ApiError(-1013, "Market is closed.")
        if otype == "MARKET":
            if price is not None:
                raise ApiError(-1106, "Parameter 'price' sent when not required.")
            qoq = self._dec(params, "quoteOrderQty")
            if qty is None and qoq is not None:
                qty = (qoq / last / spec.step).to_integral_value(ROUND_DOWN) * spec.step
            if qty is None:
                raise ApiError(
                    -1102,
                    "Param 'quantity' or 'quoteOrderQty' must be sent, but both were empty/null!",
                )
        else:
            if price is None:
                raise missing("price")
            if qty is None:
                raise missing("quantity")
        resp_type = params.get("newOrderRespType") or (
            "FULL" if otype in ("LIMIT", "MARKET") else "ACK"
        )
        if resp_type not in ("ACK", "RESULT", "FULL"):
            raise ApiError(-1100, "Illegal characters found in parameter 'newOrderRespType'.")
        # filters
        if price is not None and (
            price < spec.min_price or price > spec.max_price or (price - spec.min_price) % spec.tick
        ):
            raise ApiError(-1013, "Filter failure: PRICE_FILTER")
        max_qty = spec.market_max_qty if otype == "MARKET" else spec.max_qty
        if qty < spec.min_qty or qty > max_qty or (qty - spec.min_qty) % spec.step:
            raise ApiError(-1013, "Filter failure: LOT_SIZE")
        ref = price if price is not None else last
        if ref * qty < spec.min_notional:
            raise ApiError(-1013, "Filter failure: NOTIONAL")
        cid = params.get("newClientOrderId") or _rand_id()
        if any(o.client_order_id == cid and o.is_open for o in self.orders.values()):
            raise ApiError(-2010, "Duplicate order sent.")
        now = self.clock_ms
        crosses = price is None or fill_rules.would_cross_on_arrival(cast(Side, side), price, last)
        if otype == "LIMIT_MAKER" and crosses:
            raise self._reject(
                spec,
                params,
                cid,
                side,
                otype,
                tif,
                price,
                qty,
                "Order would immediately match and take.",
            )
        # balance
        if side == "BUY":
            need_asset, need = spec.quote, (price if price is not None else last) * qty
        else:
            need_asset, need = spec.base, qty
        if self.free.get(need_asset, ZERO) < need:
            raise self._reject(
                spec,
                params,
                cid,
                side,
                otype,
                tif,
                price,
                qty,
                "Account has insufficient balance for requested action.",
            )
        order = Order(
            symbol=spec.symbol,
            order_id=self.next_order_id,
            client_order_id=cid,
            side=side,
            type=otype,
            tif=tif,
            price=price if price is not None else ZERO,
            orig_qty=qty,
            time=now,
            update_time=now,
        )
        self.next_order_id += 1
        self.orders[order.order_id] = order
        events: list[Event] = []
        fd: FillDecision | None = None
        if crosses:
            fd = fill_rules.arrival_fill(cast(Side, side), price, qty, last, self.taker_fee)
        if fd is None and otype == "LIMIT" and tif in ("IOC", "FOK"):
            order.status = "EXPIRED"
            events.append(UserEvent(self._exec_report(order, "EXPIRED", now)))
            return self._order_response(order, resp_type, now), events
        # lock and announce
        order.lock_asset = need_asset
        order.lock_per_unit = (
            (price if price is not None else last) if side == "BUY" else Decimal(1)
        )
        self._move(need_asset, -need, need)
        events.append(UserEvent(self._exec_report(order, "NEW", now)))
        events.append(UserEvent(self._account_position([need_asset], now)))
        if fd is not None:
            tid = self.next_trade_id[spec.symbol]
            self.next_trade_id[spec.symbol] = tid + 1
            events.extend(self._apply_fill(order, fd, tid, now))
        return self._order_response(order, resp_type, now), events

    def _reject(
        self,
        spec: SymbolSpec,
        params: Mapping[str, str],
        cid: str,
        side: str,
        otype: str,
        tif: str,
        price: Decimal | None,
        qty: Decimal,
        msg: str,
    ) -> ApiError:
        """-2010 error; the REJECTED executionReport is kept for the wiring to push."""
        order = Order(
            symbol=spec.symbol,
            order_id=-1,
            client_order_id=cid,
            side=side,
            type=otype,
            tif=tif,
            price=price if price is not None else ZERO,
            orig_qty=qty,
            time=self.clock_ms,
            status="REJECTED",
        )
        err = ApiError(-2010, msg)
        self.rejected_reports.append(
            UserEvent(self._exec_report(order, "REJECTED", self.clock_ms, reason="OTHER"))
        )
        return err

    def pop_rejected(self) -> list[UserEvent]:
        out, self.rejected_reports = self.rejected_reports, []
        return out

    def _move(self, asset: str, d_free: Decimal, d_locked: Decimal) -> None:
        self.free[asset] = self.free.get(asset, ZERO) + d_free
        self.locked[asset] = self.locked.get(asset, ZERO) + d_locked
        self.account_update_time = self.clock_ms

    def _apply_fill(self, order: Order, fd: FillDecision, trade_id: int, t: int) -> list[Event]:
        spec = self.specs[order.symbol]
        release = order.lock_per_unit * fd.qty
        self._move(order.lock_asset, release, -release)
        cost = fd.price * fd.qty
        if order.side == "BUY":
            self._move(spec.quote, -cost, ZERO)
            self._move(spec.base, fd.qty - fd.fee, ZERO)
            fee_asset = spec.base
        else:
            self._move(spec.base, -fd.qty, ZERO)
            self._move(spec.quote, cost - fd.fee, ZERO)
            fee_asset = spec.quote
        order.executed_qty += fd.qty
        order.cum_quote += cost
        order.update_time = t
        order.status = "FILLED" if order.remaining <= 0 else "PARTIALLY_FILLED"
        fill = Fill(
            symbol=order.symbol,
            trade_id=trade_id,
            order_id=order.order_id,
            client_order_id=order.client_order_id,
            side=order.side,
            price=fd.price,
            qty=fd.qty,
            commission=fd.fee,
            commission_asset=fee_asset,
            is_maker=fd.is_maker,
            time=t,
        )
        order.fills.append(fill)
        self.fills.append(fill)
        return [
            UserEvent(self._exec_report(order, "TRADE", t, fill=fill)),
            UserEvent(self._account_position([spec.base, spec.quote], t)),
        ]

    def _match(self, symbol: str, tr: SynthTrade, tid: int) -> list[Event]:
        out: list[Event] = []
        first = True
        for o in list(self.orders.values()):
            if o.symbol != symbol or not o.is_open:
                continue
            fd = fill_rules.resting_fill(
                cast(Side, o.side), o.price, o.remaining, tr.price, self.maker_fee
            )
            if fd is not None:
                # Each execution is a trade of its own with a unique id per symbol, as on
                # Binance: the first takes the print's id, the others fresh ones.
                fill_id = tid
                if not first:
                    fill_id = self.next_trade_id[symbol]
                    self.next_trade_id[symbol] = fill_id + 1
                first = False
                out.extend(self._apply_fill(o, fd, fill_id, tr.time))
        return out

    def _order_response(self, o: Order, resp_type: str, t: int) -> dict[str, Any]:
        d = o.base_view()
        d["transactTime"] = t
        if resp_type == "ACK":
            return d
        d.update(o.result_fields())
        d["workingTime"] = o.time
        d["selfTradePreventionMode"] = "NONE"
        if resp_type == "FULL":
            d["fills"] = [
                {
                    "price": fmt(f.price),
                    "qty": fmt(f.qty),
                    "commission": fmt(f.commission),
                    "commissionAsset": f.commission_asset,
                    "tradeId": f.trade_id,
                }
                for f in o.fills
            ]
        return d

    def _find(self, params: Mapping[str, str]) -> Order | None:
        spec = self._spec(params)
        oid, ocid = params.get("orderId"), params.get("origClientOrderId")
        if not oid and not ocid:
            raise ApiError(
                -1102,
                "Param 'origClientOrderId' or 'orderId' must be sent, but both were empty/null!",
            )
        if oid:
            try:
                o = self.orders.get(int(oid))
            except ValueError as exc:
                raise ApiError(-1100, "Illegal characters found in parameter 'orderId'.") from exc
            if o is not None and ocid and o.client_order_id != ocid:
                return None
        else:
            cands = [x for x in self.orders.values() if x.client_order_id == ocid]
            o = cands[-1] if cands else None
        if o is None or o.symbol != spec.symbol:
            return None
        return o

    def cancel_order(self, params: Mapping[str, str]) -> tuple[dict[str, Any], list[Event]]:
        o = self._find(params)
        if o is None or not o.is_open:
            raise ApiError(-2011, "Unknown order sent.")
        t = self.clock_ms
        rem = o.remaining * o.lock_per_unit
        self._move(o.lock_asset, rem, -rem)
        o.status = "CANCELED"
        o.update_time = t
        new_cid = params.get("newClientOrderId") or _rand_id()
        d = {
            "symbol": o.symbol,
            "origClientOrderId": o.client_order_id,
            "orderId": o.order_id,
            "orderListId": -1,
            "clientOrderId": new_cid,
            "transactTime": t,
        }
        d.update(o.result_fields())
        d["selfTradePreventionMode"] = "NONE"
        rep = self._exec_report(o, "CANCELED", t)
        rep["c"], rep["C"] = new_cid, o.client_order_id
        return d, [UserEvent(rep), UserEvent(self._account_position([o.lock_asset], t))]

    def get_order(self, params: Mapping[str, str]) -> dict[str, Any]:
        o = self._find(params)
        if o is None:
            raise ApiError(-2013, "Order does not exist.")
        return o.query_view()

    def open_orders(self, params: Mapping[str, str]) -> list[dict[str, Any]]:
        sym = None
        if params.get("symbol"):
            sym = self._spec(params).symbol
        return [
            o.query_view()
            for o in self.orders.values()
            if o.is_open and (sym is None or o.symbol == sym)
        ]

    def all_orders(self, params: Mapping[str, str]) -> list[dict[str, Any]]:
        sym = self._spec(params).symbol
        rows = [o.query_view() for o in self.orders.values() if o.symbol == sym]
        return rows[-_limit(params, 500, 1000) :]

    def my_trades(self, params: Mapping[str, str]) -> list[dict[str, Any]]:
        sym = self._spec(params).symbol
        oid = params.get("orderId")
        rows = [
            f.my_trade()
            for f in self.fills
            if f.symbol == sym and (not oid or str(f.order_id) == oid)
        ]
        return rows[-_limit(params, 500, 1000) :]

    def account(self) -> dict[str, Any]:
        mk = int(self.maker_fee * 10000)
        tk = int(self.taker_fee * 10000)
        return {
            "makerCommission": mk,
            "takerCommission": tk,
            "buyerCommission": 0,
            "sellerCommission": 0,
            "commissionRates": {
                "maker": fmt(self.maker_fee),
                "taker": fmt(self.taker_fee),
                "buyer": fmt(ZERO),
                "seller": fmt(ZERO),
            },
            "canTrade": True,
            "canWithdraw": False,
            "canDeposit": False,
            "brokered": False,
            "requireSelfTradePrevention": False,
            "preventSor": False,
            "updateTime": self.account_update_time,
            "accountType": "SPOT",
            "balances": self.balances(),
            "permissions": ["SPOT"],
            "uid": 1,
        }

    def balances(self) -> list[dict[str, str]]:
        return [
            {"asset": a, "free": fmt(self.free[a]), "locked": fmt(self.locked.get(a, ZERO))}
            for a in sorted(self.free)
        ]

    # ------------------------------------------------------------- user data
    def _account_position(self, assets: list[str], t: int) -> dict[str, Any]:
        seen: list[str] = []
        for a in assets:
            if a not in seen:
                seen.append(a)
        return {
            "e": "outboundAccountPosition",
            "E": t,
            "u": t,
            "B": [
                {"a": a, "f": fmt(self.free.get(a, ZERO)), "l": fmt(self.locked.get(a, ZERO))}
                for a in seen
            ],
        }

    def _exec_report(
        self,
        o: Order,
        exec_type: str,
        t: int,
        *,
        fill: Fill | None = None,
        reason: str = "NONE",
    ) -> dict[str, Any]:
        self._seq += 1
        return {
            "e": "executionReport",
            "E": t,
            "s": o.symbol,
            "c": o.client_order_id,
            "S": o.side,
            "o": o.type,
            "f": o.tif,
            "q": fmt(o.orig_qty),
            "p": fmt(o.price),
            "P": fmt(ZERO),
            "F": fmt(ZERO),
            "g": -1,
            "C": "",
            "x": exec_type,
            "X": o.status,
            "r": reason,
            "i": o.order_id,
            "l": fmt(fill.qty) if fill else fmt(ZERO),
            "z": fmt(o.executed_qty),
            "L": fmt(fill.price) if fill else fmt(ZERO),
            "n": fmt(fill.commission) if fill else "0",
            "N": fill.commission_asset if fill else None,
            "T": t,
            "t": fill.trade_id if fill else -1,
            "I": self._seq,
            "w": o.is_open,
            "m": fill.is_maker if fill else False,
            "M": False,
            "O": o.time,
            "Z": fmt(o.cum_quote),
            "Y": fmt(fill.price * fill.qty) if fill else fmt(ZERO),
            "Q": fmt(ZERO),
            "W": o.time,
            "V": "NONE",
        }

    # ----------------------------------------------------------------- admin
    def status(self) -> dict[str, Any]:
        return {
            "clock_ms": self.clock_ms,
            "window_start_ms": self.window_start,
            "window_end_ms": self.window_end,
            "done": self.done,
            "symbols": self.symbols,
            "market_trades": self.market_trades,
            "orders": len(self.orders),
            "open_orders": sum(1 for o in self.orders.values() if o.is_open),
            "fills": len(self.fills),
            "closed_candles": dict(self.closed_candles),
        }


def _limit(params: Mapping[str, str], default: int, hi: int) -> int:
    raw = params.get("limit")
    if not raw:
        return default
    try:
        v = int(raw)
    except ValueError as exc:
        raise ApiError(-1100, "Illegal characters found in parameter 'limit'.") from exc
    return max(1, min(v, hi))


def _row(
    bucket: int,
    interval_ms: int,
    o: Decimal,
    h: Decimal,
    lo: Decimal,
    cl: Decimal,
    v: Decimal,
    q: Decimal,
    n: int,
    tb: Decimal,
    tq: Decimal,
) -> list[Any]:
    return [
        bucket,
        fmt(o),
        fmt(h),
        fmt(lo),
        fmt(cl),
        fmt(v),
        bucket + interval_ms - 1,
        fmt(q),
        n,
        fmt(tb),
        fmt(tq),
        "0",
    ]


def _ohlcv(
    trades: list[SynthTrade],
) -> tuple[Decimal, Decimal, Decimal, Decimal, Decimal, Decimal, Decimal, Decimal]:
    if not trades:
        return (ZERO,) * 8
    o = trades[0].price
    h = max(t.price for t in trades)
    lo = min(t.price for t in trades)
    c = trades[-1].price
    v = sum((t.qty for t in trades), ZERO)
    q = sum((t.price * t.qty for t in trades), ZERO)
    tb = sum((t.qty for t in trades if not t.buyer_maker), ZERO)
    tq = sum((t.price * t.qty for t in trades if not t.buyer_maker), ZERO)
    return o, h, lo, c, v, q, tb, tq
