"""The venue interface the executor trades through, and its Binance implementation.

One implementation serves the simulator, the Binance testnet and live Binance: same
protocol, different URLs and keys. (A paper venue is a later addition.)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Protocol

import aiohttp

from gridstream.common import metrics
from gridstream.common.binance import trading as bt
from gridstream.common.messages import OrderFilled, Side

log = logging.getLogger("gridstream.executor.venue")


@dataclass(frozen=True, slots=True)
class StreamConnected:
    """The execution-event stream (re)connected: events may have been missed before it."""

    reconnect: bool


@dataclass(frozen=True, slots=True)
class StreamDisconnected:
    """The execution-event stream dropped; events may be missed until it reconnects."""


@dataclass(frozen=True, slots=True)
class MalformedEvent:
    """A frame of the event stream that could not be parsed (any error), with its raw text.

    The stream goes on; the event it carried may be lost, so the executor logs it, counts
    it and reconciles (reconciliation does not depend on the stream).
    """

    raw: str
    error: str


VenueEvent = bt.ExecutionMessage | StreamConnected | StreamDisconnected | MalformedEvent


class Venue(Protocol):
    """What the executor needs from a venue. Errors are ``gridstream.common.binance.trading``'s."""

    name: str

    async def place(
        self, *, symbol: str, side: Side, price: Decimal, qty: Decimal, client_order_id: str
    ) -> bt.VenueOrder: ...

    async def cancel(self, *, symbol: str, client_order_id: str) -> bt.VenueOrder: ...

    async def get_order(
        self, *, symbol: str, client_order_id: str | None = None, venue_order_id: str | None = None
    ) -> bt.VenueOrder: ...

    async def open_orders(self, symbol: str) -> list[bt.VenueOrder]: ...

    async def trades_since(self, symbol: str, last_trade_id: int | None) -> list[OrderFilled]:
        """Own trades with an id above ``last_trade_id`` (client order id left empty)."""
        ...

    async def order_trades(self, symbol: str, venue_order_id: str) -> list[OrderFilled]:
        """Every trade of one order (client order id left empty)."""
        ...

    def events(self) -> AsyncIterator[VenueEvent]: ...

    async def close(self) -> None: ...


class BinanceVenue:
    """Binance spot over REST + the user data stream (``/ws/<listenKey>``)."""

    def __init__(
        self,
        *,
        name: str,
        rest_url: str,
        ws_url: str,
        api_key: str,
        api_secret: str,
        recv_window_ms: int = bt.DEFAULT_RECV_WINDOW_MS,
        timeout_s: float = bt.DEFAULT_TIMEOUT_S,
        keepalive_s: float = 1800.0,
        reconnect_delay_s: float = 1.0,
        service: str = "executor",
    ) -> None:
        self.name = name
        self.client = bt.TradingClient(
            rest_url, api_key, api_secret, recv_window_ms=recv_window_ms, timeout_s=timeout_s
        )
        self.ws_url = ws_url.rstrip("/")
        self.keepalive_s = keepalive_s
        self.reconnect_delay_s = reconnect_delay_s
        self.service = service
        self._closed = asyncio.Event()

    def __repr__(self) -> str:
        return f"BinanceVenue(name={self.name!r}, client={self.client!r})"

    async def close(self) -> None:
        self._closed.set()
        await self.client.close()

    async def place(
        self, *, symbol: str, side: Side, price: Decimal, qty: Decimal, client_order_id: str
    ) -> bt.VenueOrder:
        body = await self.client.new_order(
            symbol=symbol, side=side, price=price, qty=qty, client_order_id=client_order_id
        )
        return bt.parse_order(body)

    async def cancel(self, *, symbol: str, client_order_id: str) -> bt.VenueOrder:
        return bt.parse_order(
            await self.client.cancel_order(symbol=symbol, client_order_id=client_order_id)
        )

    async def get_order(
        self, *, symbol: str, client_order_id: str | None = None, venue_order_id: str | None = None
    ) -> bt.VenueOrder:
        return bt.parse_order(
            await self.client.get_order(
                symbol=symbol, client_order_id=client_order_id, order_id=venue_order_id
            )
        )

    async def open_orders(self, symbol: str) -> list[bt.VenueOrder]:
        return [bt.parse_order(o) for o in await self.client.open_orders(symbol)]

    async def trades_since(self, symbol: str, last_trade_id: int | None) -> list[OrderFilled]:
        out: dict[int, OrderFilled] = {}
        cursor = None if last_trade_id is None else last_trade_id + 1
        limit = 1000
        while True:
            page: list[dict[str, Any]] = await self.client.my_trades(
                symbol, from_id=cursor, limit=limit
            )
            now = time.time_ns()
            grew = False
            for raw in page:
                tid = int(raw["id"])
                if (last_trade_id is not None and tid <= last_trade_id) or tid in out:
                    continue
                out[tid] = bt.parse_trade(raw, client_order_id="", venue=self.name, ts_init=now)
                grew = True
            if len(page) < limit or not grew:
                break
            cursor = max(out) + 1
        return [out[k] for k in sorted(out)]

    async def order_trades(self, symbol: str, venue_order_id: str) -> list[OrderFilled]:
        # ``symbol + orderId (+ fromId)`` is a combination Binance accepts (weight 5).
        # TradingClient.my_trades has no orderId parameter yet, so the signed request is
        # made here (a change to libs/common is requested).
        out: dict[int, OrderFilled] = {}
        from_id: int | None = None
        limit = 1000
        while True:
            page = await self.client.my_trades(
                symbol, order_id=venue_order_id, from_id=from_id, limit=limit
            )
            now = time.time_ns()
            grew = False
            for raw in page:
                if str(raw.get("orderId")) != venue_order_id:
                    continue
                tid = int(raw["id"])
                if tid not in out:
                    out[tid] = bt.parse_trade(raw, client_order_id="", venue=self.name, ts_init=now)
                    grew = True
            if len(page) < limit or not grew:
                break
            from_id = max(out) + 1
        return [out[k] for k in sorted(out)]

    def parse_event(self, payload: Any) -> bt.ExecutionMessage | None:
        """One decoded user-stream payload as a message (``None``: not an order event)."""
        return bt.parse_execution_report(payload, venue=self.name, ts_init=time.time_ns())

    async def events(self) -> AsyncIterator[VenueEvent]:
        """Execution events from the user data stream, reconnecting forever until closed."""
        reconnect = False
        while not self._closed.is_set():
            connected = False
            try:
                listen_key = await self.client.start_user_stream()
                async with (
                    aiohttp.ClientSession() as session,
                    session.ws_connect(f"{self.ws_url}/ws/{listen_key}", heartbeat=30) as ws,
                ):
                    keeper = asyncio.create_task(self._keepalive(listen_key))
                    try:
                        connected = True
                        yield StreamConnected(reconnect=reconnect)
                        async for frame in ws:
                            if frame.type != aiohttp.WSMsgType.TEXT:
                                if frame.type in (
                                    aiohttp.WSMsgType.ERROR,
                                    aiohttp.WSMsgType.CLOSED,
                                ):
                                    break
                                continue
                            raw = str(frame.data)
                            try:
                                payload = json.loads(raw)
                                expired = bt.unwrap_event(payload).get("e") == "listenKeyExpired"
                                msg = None if expired else self.parse_event(payload)
                            except Exception as exc:  # any parse error: report, go on
                                yield MalformedEvent(raw, f"{type(exc).__name__}: {exc}")
                                continue
                            if expired:
                                log.warning("listenKey expired; reconnecting")
                                break
                            if msg is not None:
                                yield msg
                    finally:
                        keeper.cancel()
                        with contextlib.suppress(asyncio.CancelledError, Exception):
                            await keeper
            except (bt.BinanceError, aiohttp.ClientError, TimeoutError, ValueError) as exc:
                log.warning("user data stream failed: %s", exc)
            if connected:
                yield StreamDisconnected()
            if self._closed.is_set():
                return
            reconnect = True
            metrics.RECONNECTS.labels(self.service, "user_stream").inc()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closed.wait(), self.reconnect_delay_s)

    async def _keepalive(self, listen_key: str) -> None:
        while True:
            await asyncio.sleep(self.keepalive_s)
            try:
                await self.client.keepalive(listen_key)
            except bt.BinanceError as exc:
                log.warning("listenKey keepalive failed: %s", exc)
