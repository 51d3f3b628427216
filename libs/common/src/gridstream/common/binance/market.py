"""Binance spot market data: websocket frames and REST klines -> ``Tick`` / ``Candle``.

Parsing is pure (no clock reads, no I/O); :func:`fetch_klines` is the one I/O helper.

Conventions, chosen once and used everywhere:

* Prices and quantities are :class:`~decimal.Decimal` made from Binance's *strings*; a
  JSON number, ``NaN`` or ``Infinity`` where Binance sends a decimal string is malformed.
* ``Tick.side`` is the aggressor (taker) side. ``m`` ("is the buyer the market maker")
  true means the seller hit the bid, so the aggressor is ``SELL``.
* ``Tick.ts_event`` is the trade time ``T`` in ns. ``Candle.ts_event`` is the candle's
  ``close_time`` (ms, ``open_time + interval - 1``) times 1_000_000: the last instant the
  candle covers, identical for the websocket and the REST form of the same candle.
* ``ts_init`` is given by the caller (the wiring reads its clock); when omitted it equals
  ``ts_event``, so a replay produces identical messages.
* Ids are deterministic so a duplicate is recognisable anywhere downstream:
  ``candle:<SYMBOL>:<interval>:<open_time>``, ``tick:<SYMBOL>:<trade_id>`` for ``trade``
  and ``aggtick:<SYMBOL>:<agg_id>`` for ``aggTrade`` (trade ids and aggregate ids are
  different sequences; for an aggTrade ``Tick.trade_id`` holds the aggregate id).
* Only closed klines (``k.x`` true) become candles; a still-forming kline parses to
  ``None``. Frames that are valid but carry no market data we use (subscription
  acknowledgements, depth, bookTicker, ...) also parse to ``None``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any, Final

import aiohttp
import msgspec

from gridstream.common.binance.filters import SymbolFilters, parse_exchange_info
from gridstream.common.intervals import INTERVAL_MS as INTERVAL_MS
from gridstream.common.messages import Candle, Side, Tick, deterministic_id

NS_PER_MS: Final = 1_000_000


EVENT_TRADE: Final = "trade"
EVENT_AGG_TRADE: Final = "aggTrade"
EVENT_KLINE: Final = "kline"

SOURCE_WS: Final = "ws"
SOURCE_REST: Final = "rest"

KLINES_PATH: Final = "/api/v3/klines"
KLINES_MAX_LIMIT: Final = 1000
#: A REST kline row: open time, O, H, L, C, volume, close time, quote volume, trades,
#: taker buy base, taker buy quote, ignore. Rows shorter than this are malformed.
KLINE_ROW_MIN_FIELDS: Final = 9


def interval_ms(interval: str) -> int:
    """Length of a kline interval in ms; ``ValueError`` for an unknown interval."""
    try:
        return INTERVAL_MS[interval]
    except KeyError:
        raise ValueError(f"unsupported kline interval {interval!r}") from None


# -- stream names (Binance's, not gridstream's) ----------------------------------------------


def trade_stream(symbol: str) -> str:
    """``btcusdt@trade``."""
    return f"{symbol.lower()}@{EVENT_TRADE}"


def agg_trade_stream(symbol: str) -> str:
    """``btcusdt@aggTrade``."""
    return f"{symbol.lower()}@{EVENT_AGG_TRADE}"


def kline_stream(symbol: str, interval: str) -> str:
    """``btcusdt@kline_1m``."""
    return f"{symbol.lower()}@{EVENT_KLINE}_{interval}"


def combined_stream_url(ws_base_url: str, names: Sequence[str]) -> str:
    """``<base>/stream?streams=a/b/c``: Binance's combined-stream endpoint."""
    return f"{ws_base_url.rstrip('/')}/stream?streams={'/'.join(names)}"


# -- errors -------------------------------------------------------------------------------


class MalformedFrame(ValueError):
    """A frame or REST row that cannot be turned into market data.

    ``raw`` is the frame exactly as received (bytes), ``reason`` says why, ``stream`` is
    the combined-stream name when the envelope could be read (else ``""``).
    """

    def __init__(self, reason: str, raw: bytes | str | object, stream: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.stream = stream
        if isinstance(raw, bytes):
            self.raw = raw
        elif isinstance(raw, str):
            self.raw = raw.encode()
        else:
            self.raw = msgspec.json.encode(raw)


class BinanceHTTPError(Exception):
    """A REST request answered with a non-200 status.

    ``status`` is the HTTP status, ``code``/``msg`` Binance's error body when present,
    ``retry_after_s`` the ``Retry-After`` header when present.
    """

    kind: str = "http"

    def __init__(
        self, status: int, code: int | None, msg: str, retry_after_s: float | None = None
    ) -> None:
        super().__init__(f"HTTP {status} ({self.kind}) code={code} msg={msg}")
        self.status = status
        self.code = code
        self.msg = msg
        self.retry_after_s = retry_after_s


class RateLimited(BinanceHTTPError):
    """HTTP 429: request weight or order rate exceeded; back off."""

    kind = "rate_limited"


class IpBanned(BinanceHTTPError):
    """HTTP 418: the IP is banned for ignoring 429s."""

    kind = "ip_banned"


class ClientRequestError(BinanceHTTPError):
    """Another 4xx: the request itself is wrong (bad symbol, bad interval, ...)."""

    kind = "client"


class ServerError(BinanceHTTPError):
    """5xx: the venue failed; the outcome is unknown for writes, retryable for reads."""

    kind = "server"


def classify_http_error(
    status: int, code: int | None, msg: str, retry_after_s: float | None = None
) -> BinanceHTTPError:
    """The error class for a non-200 status."""
    cls: type[BinanceHTTPError]
    if status == 429:
        cls = RateLimited
    elif status == 418:
        cls = IpBanned
    elif 400 <= status < 500:
        cls = ClientRequestError
    elif status >= 500:
        cls = ServerError
    else:
        cls = BinanceHTTPError
    return cls(status, code, msg, retry_after_s)


# -- wire shapes --------------------------------------------------------------------------
# Decimal fields are declared ``str`` so a JSON number is rejected, not silently rounded.


class _TradeData(msgspec.Struct, tag_field="e", tag=EVENT_TRADE):
    E: int
    s: str
    t: int
    p: str
    q: str
    T: int
    m: bool


class _AggTradeData(msgspec.Struct, tag_field="e", tag=EVENT_AGG_TRADE):
    E: int
    s: str
    a: int
    p: str
    q: str
    T: int
    m: bool
    f: int = -1
    l: int = -1  # noqa: E741 - Binance's field name


class _KlineBody(msgspec.Struct):
    t: int
    T: int
    s: str
    i: str
    o: str
    c: str
    h: str
    l: str  # noqa: E741 - Binance's field name
    v: str
    n: int
    x: bool
    q: str = "0"


class _KlineData(msgspec.Struct, tag_field="e", tag=EVENT_KLINE):
    E: int
    s: str
    k: _KlineBody


class _Envelope(msgspec.Struct):
    """The combined-stream envelope of the three events we use: the typed fast path."""

    stream: str
    data: _TradeData | _AggTradeData | _KlineData


@dataclass(frozen=True, slots=True)
class ParsedFrame:
    """One parsed frame: its stream, its event type and the message (or ``None``).

    ``trades`` is how many exchange trades a tick stands for: 1 for a ``trade``,
    ``l - f + 1`` for an ``aggTrade`` (what a kline's trade count ``n`` adds up).
    """

    stream: str
    event: str
    message: Tick | Candle | None
    trades: int = 1


_json_decoder: Final = msgspec.json.Decoder()
_envelope_decoder: Final = msgspec.json.Decoder(_Envelope)


def _dec(value: str, name: str, raw: object, stream: str) -> Decimal:
    try:
        d = Decimal(value)
    except InvalidOperation:
        raise MalformedFrame(f"{name}: not a decimal: {value!r}", raw, stream) from None
    if not d.is_finite():
        raise MalformedFrame(f"{name}: not finite: {value!r}", raw, stream)
    return d


def _side(buyer_is_maker: bool) -> Side:
    return "SELL" if buyer_is_maker else "BUY"


def tick_id(symbol: str, trade_id: int) -> str:
    """The id of the tick for one trade (``deterministic_id("tick", SYMBOL, id)``, inlined:
    this is the hot path)."""
    return f"tick:{symbol.upper()}:{trade_id}"


def agg_tick_id(symbol: str, agg_id: int) -> str:
    """The id of the tick for one aggregate trade (inlined ``deterministic_id``)."""
    return f"aggtick:{symbol.upper()}:{agg_id}"


def candle_id(symbol: str, interval: str, open_time: int) -> str:
    """The id of a candle: the same for the websocket and the REST form."""
    return deterministic_id("candle", symbol.upper(), interval, open_time)


def _split_envelope(obj: object, raw: object) -> tuple[str, dict[str, Any] | None]:
    if not isinstance(obj, dict):
        raise MalformedFrame(f"frame is a {type(obj).__name__}, not an object", raw)
    if "data" in obj and "stream" in obj:
        stream = obj["stream"]
        data = obj["data"]
        if not isinstance(stream, str):
            raise MalformedFrame("envelope: 'stream' is not a string", raw)
        if not isinstance(data, dict):
            raise MalformedFrame("envelope: 'data' is not an object", raw, stream)
        return stream, data
    if "e" in obj:
        return "", obj
    if "id" in obj and ("result" in obj or "error" in obj):
        return "", None  # control-message response (SUBSCRIBE, LIST_SUBSCRIPTIONS, ...)
    raise MalformedFrame("neither a combined-stream envelope nor an event", raw)


def parse_frame(raw: bytes | str, *, ts_init: int | None = None) -> ParsedFrame:
    """Parse one websocket frame (combined-stream envelope or raw event).

    Raises :class:`MalformedFrame` when the frame cannot be read; returns a
    :class:`ParsedFrame` whose ``message`` is ``None`` for frames that carry nothing
    we publish (a still-forming kline, a control response, other event types).

    A well-formed trade/aggTrade/kline envelope is decoded straight into typed structs
    (one pass, no intermediate dict); anything else takes the general path, which
    classifies it or says exactly why it is malformed.
    """
    try:
        env = _envelope_decoder.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return _parse_general(raw, ts_init)
    return _parsed(env.data, raw, env.stream, ts_init)


def _parsed(
    data: _TradeData | _AggTradeData | _KlineData, raw: object, stream: str, ts_init: int | None
) -> ParsedFrame:
    if isinstance(data, _TradeData):
        return ParsedFrame(stream, EVENT_TRADE, _trade(data, raw, stream, ts_init))
    if isinstance(data, _AggTradeData):
        return ParsedFrame(
            stream, EVENT_AGG_TRADE, _agg_trade(data, raw, stream, ts_init), _agg_count(data)
        )
    return ParsedFrame(stream, EVENT_KLINE, _kline(data, raw, stream, ts_init))


_EVENT_TYPES: Final[Mapping[str, type[_TradeData | _AggTradeData | _KlineData]]] = {
    EVENT_TRADE: _TradeData,
    EVENT_AGG_TRADE: _AggTradeData,
    EVENT_KLINE: _KlineData,
}


def _parse_general(raw: bytes | str, ts_init: int | None) -> ParsedFrame:
    try:
        obj = _json_decoder.decode(raw)
    except msgspec.DecodeError as exc:
        raise MalformedFrame(f"invalid JSON: {exc}", raw) from None
    stream, data = _split_envelope(obj, raw)
    if data is None:
        return ParsedFrame(stream, "", None)
    event = data.get("e")
    if event is None:
        return ParsedFrame(stream, "", None)  # e.g. bookTicker: a payload without an event
    if not isinstance(event, str):
        raise MalformedFrame("event: 'e' is not a string", raw, stream)
    kind = _EVENT_TYPES.get(event)
    if kind is None:
        return ParsedFrame(stream, event, None)
    try:
        typed = msgspec.convert(data, kind)
    except msgspec.ValidationError as exc:
        raise MalformedFrame(f"{event}: {exc}", raw, stream) from None
    return _parsed(typed, raw, stream, ts_init)


def _agg_count(d: _AggTradeData) -> int:
    return d.l - d.f + 1 if 0 <= d.f <= d.l else 1


def _trade(d: _TradeData, raw: object, stream: str, ts_init: int | None) -> Tick:
    ts = d.T * NS_PER_MS
    symbol = d.s.upper()
    return Tick(
        id=tick_id(symbol, d.t),
        ts_event=ts,
        ts_init=ts if ts_init is None else ts_init,
        symbol=symbol,
        trade_id=d.t,
        price=_dec(d.p, "p", raw, stream),
        qty=_dec(d.q, "q", raw, stream),
        side=_side(d.m),
    )


def _agg_trade(d: _AggTradeData, raw: object, stream: str, ts_init: int | None) -> Tick:
    ts = d.T * NS_PER_MS
    symbol = d.s.upper()
    return Tick(
        id=agg_tick_id(symbol, d.a),
        ts_event=ts,
        ts_init=ts if ts_init is None else ts_init,
        symbol=symbol,
        trade_id=d.a,
        price=_dec(d.p, "p", raw, stream),
        qty=_dec(d.q, "q", raw, stream),
        side=_side(d.m),
    )


def _kline(d: _KlineData, raw: object, stream: str, ts_init: int | None) -> Candle | None:
    k = d.k
    if not k.x:
        return None
    if k.t > k.T:
        raise MalformedFrame(f"kline: close time {k.T} before open time {k.t}", raw, stream)
    symbol = k.s.upper()
    ts = k.T * NS_PER_MS
    return Candle(
        id=candle_id(symbol, k.i, k.t),
        ts_event=ts,
        ts_init=ts if ts_init is None else ts_init,
        symbol=symbol,
        interval=k.i,
        open_time=k.t,
        close_time=k.T,
        open=_dec(k.o, "k.o", raw, stream),
        high=_dec(k.h, "k.h", raw, stream),
        low=_dec(k.l, "k.l", raw, stream),
        close=_dec(k.c, "k.c", raw, stream),
        volume=_dec(k.v, "k.v", raw, stream),
        quote_volume=_dec(k.q, "k.q", raw, stream),
        trades=k.n,
        source=SOURCE_WS,
    )


# -- REST klines ----------------------------------------------------------------------------


def _int_field(row: Sequence[object], i: int, name: str) -> int:
    value = row[i]
    if isinstance(value, bool) or not isinstance(value, int):
        raise MalformedFrame(f"kline row: {name} is not an integer: {value!r}", row)
    return value


def _dec_field(row: Sequence[object], i: int, name: str) -> Decimal:
    value = row[i]
    if not isinstance(value, str):
        raise MalformedFrame(f"kline row: {name} is not a decimal string: {value!r}", row)
    return _dec(value, f"kline row: {name}", row, "")


def kline_row_to_candle(
    row: Sequence[object],
    symbol: str,
    interval: str,
    *,
    ts_init: int | None = None,
    source: str = SOURCE_REST,
) -> Candle:
    """One ``GET /api/v3/klines`` row (12 fields) -> :class:`Candle`."""
    if not isinstance(row, list | tuple) or len(row) < KLINE_ROW_MIN_FIELDS:
        raise MalformedFrame(f"kline row: expected a list of >= {KLINE_ROW_MIN_FIELDS}", row)
    open_time = _int_field(row, 0, "open time")
    close_time = _int_field(row, 6, "close time")
    if close_time < open_time:
        raise MalformedFrame(f"kline row: close time {close_time} before open time", row)
    symbol = symbol.upper()
    ts = close_time * NS_PER_MS
    return Candle(
        id=candle_id(symbol, interval, open_time),
        ts_event=ts,
        ts_init=ts if ts_init is None else ts_init,
        symbol=symbol,
        interval=interval,
        open_time=open_time,
        close_time=close_time,
        open=_dec_field(row, 1, "open"),
        high=_dec_field(row, 2, "high"),
        low=_dec_field(row, 3, "low"),
        close=_dec_field(row, 4, "close"),
        volume=_dec_field(row, 5, "volume"),
        quote_volume=_dec_field(row, 7, "quote volume"),
        trades=_int_field(row, 8, "trades"),
        source=source,
    )


def parse_klines(
    body: bytes | str, symbol: str, interval: str, *, ts_init: int | None = None
) -> list[Candle]:
    """A whole ``GET /api/v3/klines`` response body -> candles, in the order given."""
    try:
        rows = _json_decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise MalformedFrame(f"klines: invalid JSON: {exc}", body) from None
    if not isinstance(rows, list):
        raise MalformedFrame("klines: response is not a list", body)
    return [kline_row_to_candle(r, symbol, interval, ts_init=ts_init) for r in rows]


def _retry_after(headers: Mapping[str, str]) -> float | None:
    value = headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


async def _error_from(resp: aiohttp.ClientResponse) -> BinanceHTTPError:
    text = await resp.text()
    code: int | None = None
    msg = text[:500]
    try:
        body = _json_decoder.decode(text)
    except msgspec.DecodeError:
        body = None
    if isinstance(body, dict):
        raw_code = body.get("code")
        code = raw_code if isinstance(raw_code, int) else None
        msg = str(body.get("msg", msg))
    return classify_http_error(resp.status, code, msg, _retry_after(resp.headers))


RETRYABLE_STATUSES: Final = frozenset({418, 429, 503})

# -- request-weight budget --------------------------------------------------------------------

USED_WEIGHT_HEADER: Final = "X-MBX-USED-WEIGHT-1M"
#: Binance's default spot REQUEST_WEIGHT limit per minute.
DEFAULT_WEIGHT_LIMIT: Final = 6000
KLINES_WEIGHT: Final = 2
TIME_WEIGHT: Final = 1
#: A 429 without ``Retry-After`` waits for the next weight window.
DEFAULT_BACKOFF_S: Final = 60.0


class RestLimiter:
    """Keeps REST requests inside Binance's request-weight budget; honours 429 and 418.

    * The used weight of the current window is read from every answer's
      ``X-MBX-USED-WEIGHT-1M`` header (the venue's count, which includes other clients
      on the same IP) and counted locally between answers.
    * Before a request that would take the window above ``fraction * limit`` the caller
      waits for the next window (windows are ``window_s`` long, aligned to the clock:
      Binance counts per calendar minute).
    * A 429 blocks every request until its ``Retry-After`` (or the next window); a 418
      (IP ban) blocks every request until its ``Retry-After``. Nothing is sent meanwhile.

    One limiter is shared by every REST call of a process. ``clock`` is a wall clock in
    seconds (injectable so the window arithmetic can be tested).
    """

    def __init__(
        self,
        limit: int = DEFAULT_WEIGHT_LIMIT,
        *,
        fraction: float = 0.8,
        window_s: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if limit <= 0 or not 0 < fraction <= 1 or window_s <= 0:
            raise ValueError("RestLimiter: limit > 0, 0 < fraction <= 1, window_s > 0")
        self.limit = limit
        self.fraction = fraction
        self.window_s = window_s
        self.clock = clock
        self.used = 0
        self.window = self._window(clock())
        self.blocked_until = 0.0
        self.banned_until = 0.0
        self.waits = 0
        self.waited_s = 0.0
        self.max_used = 0
        self._lock = asyncio.Lock()

    @property
    def budget(self) -> int:
        return int(self.limit * self.fraction)

    def _window(self, now: float) -> int:
        return int(now // self.window_s)

    def _roll(self, now: float) -> None:
        w = self._window(now)
        if w != self.window:
            self.window = w
            self.used = 0

    def delay(self, weight: int) -> float:
        """Seconds to wait before a request of ``weight`` may be sent (0 = now)."""
        now = self.clock()
        self._roll(now)
        until = max(self.blocked_until, self.banned_until)
        if until > now:
            return until - now
        if self.used + weight > self.budget and self.used > 0:
            return (self.window + 1) * self.window_s - now + 0.001
        return 0.0

    async def acquire(self, weight: int) -> None:
        """Wait until ``weight`` fits the budget and no 429/418 block is active; count it."""
        async with self._lock:
            while (wait := self.delay(weight)) > 0:
                self.waits += 1
                self.waited_s += wait
                await asyncio.sleep(wait)
            self.used += weight
            self.max_used = max(self.max_used, self.used)

    def observe(self, headers: Mapping[str, str]) -> None:
        """Take the venue's count of the window from an answer's headers."""
        raw = headers.get(USED_WEIGHT_HEADER)
        if raw is None:
            return
        try:
            used = int(raw)
        except ValueError:
            return
        self._roll(self.clock())
        self.used = used
        self.max_used = max(self.max_used, used)

    def rate_limited(self, retry_after_s: float | None) -> None:
        """A 429: nothing is sent until ``Retry-After`` (default: the next window)."""
        now = self.clock()
        wait = (
            retry_after_s
            if retry_after_s is not None
            else ((self._window(now) + 1) * self.window_s - now)
        )
        self.blocked_until = max(self.blocked_until, now + wait)

    def banned(self, retry_after_s: float | None) -> None:
        """A 418: nothing is sent until ``Retry-After`` (default: ``DEFAULT_BACKOFF_S``)."""
        now = self.clock()
        wait = retry_after_s if retry_after_s is not None else DEFAULT_BACKOFF_S
        self.banned_until = max(self.banned_until, now + wait)


async def limited_get(
    session: aiohttp.ClientSession,
    url: str,
    params: Mapping[str, str],
    limiter: RestLimiter,
    weight: int,
    *,
    max_wait_s: float = 300.0,
    retries: int = 5,
) -> bytes:
    """GET inside ``limiter``'s budget. 429/418 block the limiter for their ``Retry-After``
    and the request is retried after it (at most ``retries`` times, each wait at most
    ``max_wait_s``); a longer ban raises :class:`IpBanned` and keeps the limiter blocked,
    so no request is sent before the ban ends. 503 is retried the same way."""
    attempt = 0
    while True:
        await limiter.acquire(weight)
        async with session.get(url, params=params) as resp:
            limiter.observe(resp.headers)
            if resp.status == 200:
                return await resp.read()
            error = await _error_from(resp)
        if isinstance(error, IpBanned):
            limiter.banned(error.retry_after_s)
        elif isinstance(error, RateLimited):
            limiter.rate_limited(error.retry_after_s)
        elif resp.status == 503:
            limiter.rate_limited(error.retry_after_s if error.retry_after_s is not None else 1.0)
        else:
            raise error
        if attempt >= retries or limiter.delay(weight) > max_wait_s:
            raise error
        attempt += 1


async def fetch_klines(
    session: aiohttp.ClientSession,
    base_url: str,
    symbol: str,
    interval: str,
    start_ms: int,
    end_ms: int | None,
    limit: int = KLINES_MAX_LIMIT,
    *,
    ts_init: int | None = None,
    max_retry_after_s: float = 60.0,
    retries: int = 3,
    limiter: RestLimiter | None = None,
) -> list[Candle]:
    """Every kline with ``start_ms <= open_time <= end_ms`` (``end_ms`` None: up to the
    newest the venue serves), fetched page by page of ``limit`` rows, in order.

    Non-200 answers raise a :class:`BinanceHTTPError` subclass. When a 418/429/503 carries
    ``Retry-After`` (at most ``max_retry_after_s``), the request waits that long and is
    retried, up to ``retries`` times. ``ts_init`` defaults to the wall clock at receipt.
    With a ``limiter`` every page goes through :func:`limited_get` (weight budget, 429 and
    418 blocks shared with every other request of the process).
    """
    step = interval_ms(interval)  # fails fast on an unknown interval
    limit = max(1, min(limit, KLINES_MAX_LIMIT))
    url = f"{base_url.rstrip('/')}{KLINES_PATH}"
    out: list[Candle] = []
    cursor = start_ms
    while end_ms is None or cursor <= end_ms:
        params: dict[str, str] = {
            "symbol": symbol.upper(),
            "interval": interval,
            "startTime": str(cursor),
            "limit": str(limit),
        }
        if end_ms is not None:
            params["endTime"] = str(end_ms)
        if limiter is not None:
            body = await limited_get(
                session, url, params, limiter, KLINES_WEIGHT, max_wait_s=max_retry_after_s
            )
        else:
            body = await _get_with_retry_after(session, url, params, max_retry_after_s, retries)
        page = parse_klines(
            body, symbol, interval, ts_init=time.time_ns() if ts_init is None else ts_init
        )
        page = [
            c for c in page if c.open_time >= cursor and (end_ms is None or c.open_time <= end_ms)
        ]
        out.extend(page)
        if not page or len(page) < limit:
            break
        cursor = page[-1].open_time + step  # the next open time: no empty last page
    return out


async def _get_with_retry_after(
    session: aiohttp.ClientSession,
    url: str,
    params: Mapping[str, str],
    max_retry_after_s: float,
    retries: int,
) -> bytes:
    attempt = 0
    while True:
        async with session.get(url, params=params) as resp:
            if resp.status == 200:
                return await resp.read()
            error = await _error_from(resp)
        wait = error.retry_after_s
        if (
            resp.status in RETRYABLE_STATUSES
            and wait is not None
            and wait <= max_retry_after_s
            and attempt < retries
        ):
            attempt += 1
            await asyncio.sleep(wait)
            continue
        raise error


TIME_PATH: Final = "/api/v3/time"


async def fetch_server_time(
    session: aiohttp.ClientSession, base_url: str, *, limiter: RestLimiter | None = None
) -> int:
    """The venue's clock (``GET /api/v3/time``), in ms."""
    url = f"{base_url.rstrip('/')}{TIME_PATH}"
    if limiter is not None:
        body = await limited_get(session, url, {}, limiter, TIME_WEIGHT)
    else:
        body = await _get_with_retry_after(session, url, {}, 60.0, 3)
    try:
        obj = _json_decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise MalformedFrame(f"time: invalid JSON: {exc}", body) from None
    server_time = obj.get("serverTime") if isinstance(obj, dict) else None
    if isinstance(server_time, bool) or not isinstance(server_time, int):
        raise MalformedFrame("time: no integer 'serverTime'", body)
    return server_time


async def fetch_latest_klines(
    session: aiohttp.ClientSession,
    base_url: str,
    symbol: str,
    interval: str,
    count: int,
    *,
    ts_init: int | None = None,
    limiter: RestLimiter | None = None,
) -> list[Candle]:
    """The newest ``count`` klines the venue serves, oldest first (pages backwards by 1000).

    Real Binance includes the still-forming kline last: filter with the venue clock
    (``close_time < fetch_server_time(...)``) before treating these as closed.
    """
    interval_ms(interval)
    url = f"{base_url.rstrip('/')}{KLINES_PATH}"
    pages: list[list[Candle]] = []
    remaining = count
    end: int | None = None
    while remaining > 0:
        limit = min(remaining, KLINES_MAX_LIMIT)
        params = {"symbol": symbol.upper(), "interval": interval, "limit": str(limit)}
        if end is not None:
            params["endTime"] = str(end)
        if limiter is not None:
            body = await limited_get(session, url, params, limiter, KLINES_WEIGHT)
        else:
            body = await _get_with_retry_after(session, url, params, 60.0, 3)
        page = parse_klines(
            body, symbol, interval, ts_init=time.time_ns() if ts_init is None else ts_init
        )
        if end is not None:
            page = [c for c in page if c.open_time <= end]
        if not page:
            break
        pages.append(page)
        remaining -= len(page)
        if len(page) < limit:
            break
        end = page[0].open_time - 1
    return [c for page in reversed(pages) for c in page]


EXCHANGE_INFO_PATH: Final = "/api/v3/exchangeInfo"


async def fetch_symbol_filters(
    base_url: str,
    symbols: Sequence[str],
    stop: asyncio.Event,
    *,
    retry_s: float = 2.0,
    on_retry: Callable[[Exception], None] | None = None,
) -> dict[str, SymbolFilters]:
    """The exchange filters of ``symbols`` from ``exchangeInfo``, retrying until it answers.

    Raises the last error only if ``stop`` is set while waiting.
    """
    url = base_url.rstrip("/") + EXCHANGE_INFO_PATH
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while True:
            try:
                async with session.get(url) as resp:
                    resp.raise_for_status()
                    payload = await resp.json(content_type=None)
                return parse_exchange_info(payload, list(symbols))
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                if stop.is_set():
                    raise
                if on_retry is not None:
                    on_retry(exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), retry_s)
                if stop.is_set():
                    raise
