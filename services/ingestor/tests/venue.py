"""A small real Binance-like venue for the ingestor's tests (aiohttp, localhost).

Combined stream ``/stream``, ``/api/v3/klines`` (Binance paging), ``/api/v3/time``, and
Binance's request-weight accounting: ``X-MBX-USED-WEIGHT-1M`` on every answer, a 429 with
``Retry-After`` and -1003 once the window's weight exceeds ``weight_limit``, a 418 for a
request sent while a 429 is in force. ``window_s`` shortens the minute so tests are fast.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import WSMsgType, web
from ingestor_factories import rest_row

KLINES_WEIGHT = 2


class CountingWebSocket(web.WebSocketResponse):
    """aiohttp's websocket response, counting the heartbeat pings it sends (test hook)."""

    def __init__(self, venue: Venue, **kw: Any) -> None:
        super().__init__(**kw)
        self._venue = venue

    def _send_heartbeat(self) -> None:
        waiting = self._pong_response_cb
        super()._send_heartbeat()
        # a ping went out when a new wait for its pong was armed
        if self._pong_response_cb is not None and self._pong_response_cb is not waiting:
            self._venue.pings += 1


class Venue:
    def __init__(
        self,
        rows: tuple[dict[str, str], ...] | list[dict[str, str]],
        clock: int,
        *,
        symbol: str = "BTCUSDT",
        interval: str = "1m",
        weight_limit: int = 1_000_000,
        window_s: float = 60.0,
        heartbeat: float | None = None,
    ) -> None:
        self.rows = list(rows)
        self.clock = clock
        self.symbol = symbol
        self.interval = interval
        self.weight_limit = weight_limit
        self.window_s = window_s
        self.heartbeat = heartbeat
        self.sockets: list[web.WebSocketResponse] = []
        self.connections = 0
        #: heartbeat pings sent (each must be answered within heartbeat/2, or aiohttp closes)
        self.pings = 0
        self.kline_queries: list[dict[str, str]] = []
        self.statuses: list[int] = []
        self.used: dict[int, int] = {}
        self.max_used = 0
        self.blocked_until = 0.0
        self.fail_next: list[tuple[int, dict[str, str]]] = []

    # -- weights -----------------------------------------------------------------------------
    def _weigh(self, weight: int) -> tuple[int, web.Response | None]:
        now = time.time()
        window = int(now // self.window_s)
        used = self.used[window] = self.used.get(window, 0) + weight
        self.max_used = max(self.max_used, used)
        headers = {"X-MBX-USED-WEIGHT-1M": str(used)}
        if self.fail_next:
            status, extra = self.fail_next.pop(0)
            body = {"code": -1003, "msg": "Way too many requests; IP banned."}
            return used, web.json_response(body, status=status, headers={**headers, **extra})
        if now < self.blocked_until:
            body = {"code": -1003, "msg": "Way too many requests; IP banned until later."}
            retry = str(int(self.blocked_until - now) + 1)
            return used, web.json_response(
                body, status=418, headers={**headers, "Retry-After": retry}
            )
        if used > self.weight_limit:
            retry = (window + 1) * self.window_s - now
            self.blocked_until = now + retry
            body = {"code": -1003, "msg": "Too much request weight used; please use WebSocket."}
            return used, web.json_response(
                body, status=429, headers={**headers, "Retry-After": f"{retry:.3f}"}
            )
        return used, None

    def _respond(self, data: Any, weight: int) -> web.Response:
        used, error = self._weigh(weight)
        resp = error or web.json_response(data, headers={"X-MBX-USED-WEIGHT-1M": str(used)})
        self.statuses.append(resp.status)
        return resp

    # -- handlers ----------------------------------------------------------------------------
    async def klines(self, request: web.Request) -> web.Response:
        q = dict(request.query)
        self.kline_queries.append(q)
        if q.get("symbol") != self.symbol or q.get("interval") != self.interval:
            return web.json_response({"code": -1121, "msg": "Invalid symbol."}, status=400)
        limit = int(q.get("limit", "500"))
        closed = [rest_row(r) for r in self.rows[: self.clock]]
        if "endTime" in q:
            closed = [r for r in closed if r[0] <= int(q["endTime"])]
        if "startTime" in q:
            data = [r for r in closed if r[0] >= int(q["startTime"])][:limit]
        else:
            data = closed[-limit:]
        return self._respond(data, KLINES_WEIGHT)

    async def server_time(self, _: web.Request) -> web.Response:
        now = int(self.rows[self.clock - 1]["close_time_ms"]) + 1
        return self._respond({"serverTime": now}, 1)

    async def ws(self, request: web.Request) -> web.WebSocketResponse:
        ws = CountingWebSocket(self, heartbeat=self.heartbeat)
        await ws.prepare(request)
        self.sockets.append(ws)
        self.connections += 1
        async for msg in ws:
            if msg.type == WSMsgType.ERROR:
                break
        return ws

    async def send(self, frames: list[bytes]) -> None:
        for ws in list(self.sockets):
            for frame in frames:
                await ws.send_str(frame.decode())

    async def drop(self) -> None:
        sockets, self.sockets = self.sockets, []
        for ws in sockets:
            await ws.close()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/api/v3/klines", self.klines)
        app.router.add_get("/api/v3/time", self.server_time)
        app.router.add_get("/stream", self.ws)
        return app


@asynccontextmanager
async def serve(venue: Venue, port: int = 0) -> AsyncIterator[str]:
    """Run ``venue`` on localhost; yields ``host:port``."""
    runner = web.AppRunner(venue.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"127.0.0.1:{bound}"
    finally:
        await venue.drop()
        await runner.cleanup()
