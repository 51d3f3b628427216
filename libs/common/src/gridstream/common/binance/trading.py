"""Binance spot trading: a signed async REST client, its error classes, and pure parsers.

* :class:`TradingClient` signs ``/api/v3`` requests with HMAC-SHA256 over the
  urlencoded parameters (``timestamp``, ``recvWindow`` included) and sends the
  ``X-MBX-APIKEY`` header. The secret is kept private: never logged, never in a repr.
* Errors are classified from the HTTP status and Binance error code
  (:func:`classify`) so a caller knows whether the request *did not* happen
  (:class:`DefiniteError` and subclasses) or *may* have happened
  (:class:`UnknownOutcome`: query the venue, never resend blindly).
* Pure parsers turn user-data-stream events and REST payloads into bus messages
  with deterministic ids, so the same venue event always yields the same message id.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal
from typing import Any, Final, cast
from urllib.parse import urlencode

import aiohttp
import msgspec

from gridstream.common.binance.statuses import OPEN_STATUSES
from gridstream.common.messages import (
    Actions,
    IntentAction,
    OrderAccepted,
    OrderCanceled,
    OrderFailed,
    OrderFilled,
    Side,
    deterministic_id,
)

log = logging.getLogger("gridstream.binance.trading")

API: Final = "/api/v3"
DEFAULT_RECV_WINDOW_MS: Final = 5000
DEFAULT_TIMEOUT_S: Final = 10.0

# Binance error codes we act on.
CODE_UNKNOWN: Final = -1000
CODE_DISCONNECTED: Final = -1001
CODE_UNEXPECTED_RESP: Final = -1006
CODE_TIMEOUT: Final = -1007
CODE_TIMESTAMP: Final = -1021
CODE_BAD_SIGNATURE: Final = -1022
CODE_FILTER_FAILURE: Final = -1013
CODE_NEW_ORDER_REJECTED: Final = -2010
CODE_CANCEL_REJECTED: Final = -2011
CODE_NO_SUCH_ORDER: Final = -2013
CODE_BAD_API_KEY_FMT: Final = -2014
CODE_REJECTED_MBX_KEY: Final = -2015

#: Error codes whose request may or may not have been executed.
UNKNOWN_OUTCOME_CODES: Final = frozenset(
    {CODE_UNKNOWN, CODE_DISCONNECTED, CODE_UNEXPECTED_RESP, CODE_TIMEOUT}
)
AUTH_CODES: Final = frozenset(
    {-1002, CODE_BAD_SIGNATURE, CODE_BAD_API_KEY_FMT, CODE_REJECTED_MBX_KEY}
)


# ----------------------------------------------------------------------------- errors
class BinanceError(Exception):
    """A request failed. ``code`` is Binance's error code (0 when none was given)."""

    def __init__(self, code: int, msg: str, http_status: int = 0) -> None:
        super().__init__(f"binance error {code} (HTTP {http_status}): {msg}")
        self.code = code
        self.msg = msg
        self.http_status = http_status


class DefiniteError(BinanceError):
    """The venue refused the request: it did not take effect."""


class TimestampError(DefiniteError):
    """``-1021``: the timestamp is outside ``recvWindow``; retry after a time sync."""


class RejectedError(DefiniteError):
    """The venue rejected the order or request (``-2010``, ``-1013``, bad parameters...)."""


class UnknownOrderError(DefiniteError):
    """``-2011`` (cancel of an unknown order) or ``-2013`` (order does not exist)."""


class AuthError(DefiniteError):
    """Bad API key, permissions or signature."""


class RateLimitedError(DefiniteError):
    """HTTP 429 (or 418: IP banned); wait ``retry_after_s`` before the next request."""

    def __init__(self, code: int, msg: str, http_status: int, retry_after_s: float) -> None:
        super().__init__(code, msg, http_status)
        self.retry_after_s = retry_after_s


class UnknownOutcome(BinanceError):
    """5xx, a timeout or a dropped connection: the request may or may not have happened."""


def classify(http_status: int, body: Any, headers: Mapping[str, str] | None = None) -> BinanceError:
    """The error for an HTTP response that was not a success."""
    code = 0
    msg = ""
    if isinstance(body, Mapping):
        try:
            code = int(body.get("code", 0))
        except (TypeError, ValueError):
            code = 0
        msg = str(body.get("msg", ""))
    elif body is not None:
        msg = str(body)[:500]
    if http_status in (418, 429):
        retry_after = 0.0
        raw = (headers or {}).get("Retry-After")
        if raw is not None:
            try:
                retry_after = float(raw)
            except ValueError:
                retry_after = 0.0
        return RateLimitedError(code, msg or "rate limited", http_status, retry_after)
    if http_status >= 500 or code in UNKNOWN_OUTCOME_CODES:
        return UnknownOutcome(code, msg or "server error", http_status)
    if code == CODE_TIMESTAMP:
        return TimestampError(code, msg, http_status)
    if code in (CODE_CANCEL_REJECTED, CODE_NO_SUCH_ORDER):
        return UnknownOrderError(code, msg, http_status)
    if code in AUTH_CODES or http_status in (401, 403):
        return AuthError(code, msg, http_status)
    return RejectedError(code, msg, http_status)


# ----------------------------------------------------------------------------- signing
def sign(secret: bytes, query: str) -> str:
    """HMAC-SHA256 of the urlencoded query, hex, as Binance expects in ``signature``."""
    return hmac.new(secret, query.encode(), hashlib.sha256).hexdigest()


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


def _fmt(value: object) -> str:
    if isinstance(value, Decimal):
        return (
            format(value.normalize(), "f") if value == value.to_integral() else format(value, "f")
        )
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


Params = Mapping[str, object]


class TradingClient:
    """Async signed REST client for Binance spot (and the simulator / testnet: same protocol)."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        api_secret: str,
        *,
        recv_window_ms: int = DEFAULT_RECV_WINDOW_MS,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        session: aiohttp.ClientSession | None = None,
        clock_ms: Callable[[], int] = _wall_ms,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._api_key = api_key
        self._secret = api_secret.encode()
        self.recv_window_ms = recv_window_ms
        self.timeout_s = timeout_s
        self._session = session
        self._own_session = session is None
        self._clock_ms = clock_ms
        self.time_offset_ms = 0
        self.used_weight = 0

    def __repr__(self) -> str:
        return f"TradingClient(base_url={self.base_url!r}, api_key=***, api_secret=***)"

    __str__ = __repr__

    async def __aenter__(self) -> TradingClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout_s)
            )
            self._own_session = True
        return self._session

    async def close(self) -> None:
        if self._own_session and self._session is not None and not self._session.closed:
            await self._session.close()

    # -- transport --------------------------------------------------------------------------
    async def _request(
        self, method: str, path: str, params: Params | None = None, *, signed: bool, key: bool
    ) -> Any:
        items = [(k, _fmt(v)) for k, v in (params or {}).items() if v is not None]
        if signed:
            items.append(("recvWindow", str(self.recv_window_ms)))
            items.append(("timestamp", str(self._clock_ms() + self.time_offset_ms)))
        query = urlencode(items)
        if signed:
            query = f"{query}&signature={sign(self._secret, query)}"
        url = f"{self.base_url}{path}" + (f"?{query}" if query else "")
        headers = {"X-MBX-APIKEY": self._api_key} if key or signed else {}
        session = self._get_session()
        try:
            async with session.request(method, url, headers=headers) as resp:
                weight = resp.headers.get("X-MBX-USED-WEIGHT-1M")
                if weight is not None and weight.isdigit():
                    self.used_weight = int(weight)
                try:
                    body: Any = await resp.json(content_type=None)
                except (ValueError, aiohttp.ContentTypeError):
                    body = await resp.text()
                if resp.status >= 400:
                    raise classify(resp.status, body, resp.headers)
                return body
        except aiohttp.ClientConnectorError as exc:
            # The connection was never made: the request did not reach the venue.
            raise DefiniteError(0, f"cannot connect: {exc}", 0) from exc
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise UnknownOutcome(0, f"{type(exc).__name__}: {exc}", 0) from exc

    async def _signed(self, method: str, path: str, params: Params | None = None) -> Any:
        """A signed request; on ``-1021`` re-sync the clock once and retry (it did not run)."""
        try:
            return await self._request(method, path, params, signed=True, key=True)
        except TimestampError:
            await self.sync_time()
            return await self._request(method, path, params, signed=True, key=True)

    # -- public -----------------------------------------------------------------------------
    async def server_time(self) -> int:
        body = await self._request("GET", f"{API}/time", signed=False, key=False)
        return int(body["serverTime"])

    async def sync_time(self) -> int:
        """Measure the offset of the venue's clock to ours; returns it in ms."""
        before = self._clock_ms()
        server = await self.server_time()
        after = self._clock_ms()
        self.time_offset_ms = server - (before + after) // 2
        return self.time_offset_ms

    async def exchange_info(self, symbols: Sequence[str] | None = None) -> dict[str, Any]:
        params: dict[str, object] = {}
        if symbols:
            params["symbols"] = "[" + ",".join(f'"{s.upper()}"' for s in symbols) + "]"
        body = await self._request("GET", f"{API}/exchangeInfo", params, signed=False, key=False)
        return cast(dict[str, Any], body)

    # -- orders -----------------------------------------------------------------------------
    async def new_order(
        self,
        *,
        symbol: str,
        side: Side,
        price: Decimal,
        qty: Decimal,
        client_order_id: str,
        order_type: str = "LIMIT",
        time_in_force: str = "GTC",
    ) -> dict[str, Any]:
        """``POST /api/v3/order`` (LIMIT GTC by default, RESULT response)."""
        params: dict[str, object] = {
            "symbol": symbol,
            "side": side,
            "type": order_type,
            "timeInForce": time_in_force if order_type == "LIMIT" else None,
            "quantity": qty,
            "price": price if order_type != "MARKET" else None,
            "newClientOrderId": client_order_id,
            "newOrderRespType": "RESULT",
        }
        return cast(dict[str, Any], await self._signed("POST", f"{API}/order", params))

    async def cancel_order(
        self, *, symbol: str, client_order_id: str | None = None, order_id: str | None = None
    ) -> dict[str, Any]:
        params = {"symbol": symbol, "origClientOrderId": client_order_id, "orderId": order_id}
        return cast(dict[str, Any], await self._signed("DELETE", f"{API}/order", params))

    async def get_order(
        self, *, symbol: str, client_order_id: str | None = None, order_id: str | None = None
    ) -> dict[str, Any]:
        params = {"symbol": symbol, "origClientOrderId": client_order_id, "orderId": order_id}
        return cast(dict[str, Any], await self._signed("GET", f"{API}/order", params))

    async def open_orders(self, symbol: str | None = None) -> list[dict[str, Any]]:
        return cast(
            list[dict[str, Any]],
            await self._signed("GET", f"{API}/openOrders", {"symbol": symbol}),
        )

    async def my_trades(
        self,
        symbol: str,
        *,
        from_id: int | None = None,
        start_time_ms: int | None = None,
        order_id: int | str | None = None,
        limit: int = 1000,
    ) -> list[dict[str, Any]]:
        """Own trades of ``symbol`` (optionally of one order), oldest first."""
        params = {
            "symbol": symbol,
            "orderId": order_id,
            "fromId": from_id,
            "startTime": start_time_ms,
            "limit": limit,
        }
        return cast(list[dict[str, Any]], await self._signed("GET", f"{API}/myTrades", params))

    async def account(self) -> dict[str, Any]:
        return cast(dict[str, Any], await self._signed("GET", f"{API}/account"))

    # -- user data stream -------------------------------------------------------------------
    async def start_user_stream(self) -> str:
        body = await self._request("POST", f"{API}/userDataStream", signed=False, key=True)
        return str(body["listenKey"])

    async def keepalive(self, listen_key: str) -> None:
        await self._request(
            "PUT", f"{API}/userDataStream", {"listenKey": listen_key}, signed=False, key=True
        )

    async def close_user_stream(self, listen_key: str) -> None:
        await self._request(
            "DELETE", f"{API}/userDataStream", {"listenKey": listen_key}, signed=False, key=True
        )


async def sleep_for_rate_limit(exc: RateLimitedError, default_s: float = 1.0) -> None:
    """Wait as long as the venue asked (``Retry-After``), or ``default_s``."""
    await asyncio.sleep(exc.retry_after_s if exc.retry_after_s > 0 else default_s)


# ----------------------------------------------------------------------------- parsers
class Balance(msgspec.Struct, frozen=True):
    free: Decimal
    locked: Decimal


class VenueOrder(msgspec.Struct, frozen=True, kw_only=True):
    """An order as ``GET /api/v3/order`` / ``openOrders`` / ``POST /api/v3/order`` return it."""

    symbol: str
    venue_order_id: str
    client_order_id: str
    status: str
    side: Side
    price: Decimal
    qty: Decimal
    filled_qty: Decimal
    time_ms: int

    @property
    def is_open(self) -> bool:
        return self.status in OPEN_STATUSES


def unwrap_event(payload: Mapping[str, Any]) -> Mapping[str, Any]:
    """The event from a bare event, ``{"stream", "data"}`` or ``{"subscriptionId", "event"}``."""
    for key in ("event", "data"):
        inner = payload.get(key)
        if isinstance(inner, Mapping) and "e" in inner:
            return inner
    return payload


def _ns(ms: object) -> int:
    return int(cast(int, ms)) * 1_000_000


def fill_id(venue: str, symbol: str, trade_id: object) -> str:
    """Message id of a fill: one per (venue, symbol, venue trade id)."""
    return deterministic_id(venue, symbol, "trade", trade_id)


def order_event_id(venue: str, symbol: str, venue_order_id: object, status: str) -> str:
    """Message id of an order status event: one per (venue, symbol, venue order id, status)."""
    return deterministic_id(venue, symbol, "order", venue_order_id, status)


ExecutionMessage = OrderAccepted | OrderCanceled | OrderFilled | OrderFailed


def parse_execution_report(
    payload: Mapping[str, Any], *, venue: str, ts_init: int
) -> ExecutionMessage | None:
    """An ``executionReport`` as a bus message, or ``None`` for kinds we do not act on.

    ``x`` (execution type): NEW -> accepted, TRADE -> filled, CANCELED/EXPIRED ->
    canceled, REJECTED -> failed. On a cancel, ``C`` holds the original client order id.
    """
    ev = unwrap_event(payload)
    if ev.get("e") != "executionReport":
        return None
    symbol = str(ev["s"])
    exec_type = str(ev["x"])
    venue_order_id = str(ev["i"])
    orig = ev.get("C") or ""
    client_order_id = str(orig) if orig else str(ev["c"])
    side = cast(Side, str(ev["S"]))
    ts_event = _ns(ev.get("T") or ev["E"])
    if exec_type == "NEW":
        return OrderAccepted(
            id=order_event_id(venue, symbol, venue_order_id, "NEW"),
            ts_event=ts_event,
            ts_init=ts_init,
            symbol=symbol,
            client_order_id=client_order_id,
            venue_order_id=venue_order_id,
            side=side,
            price=Decimal(str(ev["p"])),
            qty=Decimal(str(ev["q"])),
        )
    if exec_type == "TRADE":
        return OrderFilled(
            id=fill_id(venue, symbol, ev["t"]),
            ts_event=ts_event,
            ts_init=ts_init,
            symbol=symbol,
            client_order_id=client_order_id,
            venue_order_id=venue_order_id,
            trade_id=str(ev["t"]),
            side=side,
            price=Decimal(str(ev["L"])),
            qty=Decimal(str(ev["l"])),
            fee=Decimal(str(ev.get("n") or "0")),
            fee_asset=str(ev.get("N") or ""),
            liquidity="maker" if ev.get("m") else "taker",
            venue=venue,
        )
    if exec_type in ("CANCELED", "EXPIRED"):
        return OrderCanceled(
            id=order_event_id(venue, symbol, venue_order_id, "CANCELED"),
            ts_event=ts_event,
            ts_init=ts_init,
            symbol=symbol,
            client_order_id=client_order_id,
            venue_order_id=venue_order_id,
            filled_qty=Decimal(str(ev.get("z") or "0")),
        )
    if exec_type == "REJECTED":
        return OrderFailed(
            id=order_event_id(venue, symbol, client_order_id, "REJECTED"),
            ts_event=ts_event,
            ts_init=ts_init,
            symbol=symbol,
            client_order_id=client_order_id,
            action=Actions.PLACE,
            code=0,
            reason=str(ev.get("r") or "REJECTED"),
        )
    return None


def parse_account_position(payload: Mapping[str, Any]) -> dict[str, Balance]:
    """An ``outboundAccountPosition`` event as ``{asset: Balance}``."""
    ev = unwrap_event(payload)
    return {
        str(b["a"]): Balance(Decimal(str(b["f"])), Decimal(str(b["l"]))) for b in ev.get("B", ())
    }


def parse_account_balances(payload: Mapping[str, Any]) -> dict[str, Balance]:
    """``GET /api/v3/account`` balances as ``{asset: Balance}``."""
    return {
        str(b["asset"]): Balance(Decimal(str(b["free"])), Decimal(str(b["locked"])))
        for b in payload.get("balances", ())
    }


def parse_order(payload: Mapping[str, Any]) -> VenueOrder:
    """A REST order payload (query, open orders, new-order RESULT/FULL, cancel)."""
    coid = payload.get("origClientOrderId") or payload.get("clientOrderId") or ""
    return VenueOrder(
        symbol=str(payload["symbol"]),
        venue_order_id=str(payload["orderId"]),
        client_order_id=str(coid),
        status=str(payload.get("status", "NEW")),
        side=cast(Side, str(payload.get("side", "BUY"))),
        price=Decimal(str(payload.get("price", "0"))),
        qty=Decimal(str(payload.get("origQty", "0"))),
        filled_qty=Decimal(str(payload.get("executedQty", "0"))),
        time_ms=int(
            payload.get("updateTime")
            or payload.get("transactTime")
            or payload.get("workingTime")
            or payload.get("time")
            or 0
        ),
    )


def order_accepted(order: VenueOrder, *, venue: str, ts_init: int) -> OrderAccepted:
    """The :class:`OrderAccepted` for a venue order (same id as the stream's NEW event)."""
    return OrderAccepted(
        id=order_event_id(venue, order.symbol, order.venue_order_id, "NEW"),
        ts_event=order.time_ms * 1_000_000,
        ts_init=ts_init,
        symbol=order.symbol,
        client_order_id=order.client_order_id,
        venue_order_id=order.venue_order_id,
        side=order.side,
        price=order.price,
        qty=order.qty,
    )


def order_canceled(order: VenueOrder, *, venue: str, ts_init: int) -> OrderCanceled:
    """The :class:`OrderCanceled` for a venue order (same id as the stream's CANCELED event)."""
    return OrderCanceled(
        id=order_event_id(venue, order.symbol, order.venue_order_id, "CANCELED"),
        ts_event=order.time_ms * 1_000_000,
        ts_init=ts_init,
        symbol=order.symbol,
        client_order_id=order.client_order_id,
        venue_order_id=order.venue_order_id,
        filled_qty=order.filled_qty,
    )


def order_failed(
    *,
    symbol: str,
    client_order_id: str,
    action: IntentAction,
    error: BinanceError,
    ts_event: int,
    ts_init: int,
) -> OrderFailed:
    """The :class:`OrderFailed` for a definite refusal of a request."""
    return OrderFailed(
        id=deterministic_id("failed", action, client_order_id),
        ts_event=ts_event,
        ts_init=ts_init,
        symbol=symbol,
        client_order_id=client_order_id,
        action=action,
        code=error.code,
        reason=error.msg,
    )


def parse_trade(
    payload: Mapping[str, Any], *, client_order_id: str, venue: str, ts_init: int
) -> OrderFilled:
    """One ``GET /api/v3/myTrades`` entry as :class:`OrderFilled` (same id as the stream's)."""
    symbol = str(payload["symbol"])
    return OrderFilled(
        id=fill_id(venue, symbol, payload["id"]),
        ts_event=_ns(payload["time"]),
        ts_init=ts_init,
        symbol=symbol,
        client_order_id=client_order_id,
        venue_order_id=str(payload["orderId"]),
        trade_id=str(payload["id"]),
        side="BUY" if payload.get("isBuyer") else "SELL",
        price=Decimal(str(payload["price"])),
        qty=Decimal(str(payload["qty"])),
        fee=Decimal(str(payload.get("commission") or "0")),
        fee_asset=str(payload.get("commissionAsset") or ""),
        liquidity="maker" if payload.get("isMaker") else "taker",
        venue=venue,
    )
