"""Lockstep mode (GS_SIM_LOCKSTEP) over a real server and real websocket clients: the
replay waits at every barrier until ``POST /sim/resume`` names it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from decimal import Decimal
from typing import Any

import aiohttp
from sim_helpers import KEY, WINDOW_START, read_csv, settings, sign

from gridstream.simulator.server import SIM_KEY, Simulator, start

MIN = 60_000
H = {"X-MBX-APIKEY": KEY}
STREAMS = "btcusdt@trade/btcusdt@kline_1m/ethusdt@kline_1m"
DEADLINE_S = 20


class Market:
    """A market-data websocket whose frames are collected as they come."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.frames: list[dict[str, Any]] = []
        self.replies: list[dict[str, Any]] = []
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            data = json.loads(msg.data)
            (self.replies if "result" in data else self.frames).append(data)

    async def sync(self, rid: int) -> list[dict[str, Any]]:
        """Every frame the server wrote before now (a request's reply comes after them)."""
        await self.ws.send_json({"method": "LIST_SUBSCRIPTIONS", "id": rid})
        await until(lambda: any(r["id"] == rid for r in self.replies))
        return [f["data"] for f in self.frames]

    async def close(self) -> None:
        await self.ws.close()
        self._task.cancel()


async def until(cond: Callable[[], bool], timeout: float = DEADLINE_S) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.005)


async def status(http: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with http.get(url + "/sim/status") as r:
        assert r.status == 200
        body: dict[str, Any] = await r.json()
        return body


async def at_barrier(http: aiohttp.ClientSession, url: str, n: int) -> dict[str, Any]:
    """The status once the replay waits at barrier ``n`` and every frame is written."""
    async with asyncio.timeout(DEADLINE_S):
        while True:
            st = await status(http, url)
            assert st["barrier"] <= n, st
            if st["paused"] and st["barrier"] == n and st["unsent_frames"] == 0:
                return st
            await asyncio.sleep(0.005)


async def resume(http: aiohttp.ClientSession, url: str, body: Any) -> tuple[int, Any]:
    async with http.post(url + "/sim/resume", data=body) as r:
        return r.status, await r.json()


def closed(frames: list[dict[str, Any]]) -> list[tuple[str, int]]:
    return [(f["s"], f["k"]["t"]) for f in frames if f["e"] == "kline" and f["k"]["x"]]


@asynccontextmanager
async def lockstep(**kw: Any) -> AsyncIterator[tuple[aiohttp.ClientSession, str, Simulator]]:
    runner, url = await start(settings(lockstep=True, **kw))
    try:
        async with aiohttp.ClientSession(headers=H) as http:
            yield http, url, runner.app[SIM_KEY]
    finally:
        await runner.cleanup()


async def test_pauses_at_barrier_1_before_any_market_frame() -> None:
    async with lockstep(hours=0.05) as (http, url, _):
        market = Market(await http.ws_connect(f"{url}/stream?streams={STREAMS}"))
        st = await at_barrier(http, url, 1)
        assert (st["lockstep"], st["pause_phase"], st["started"]) == (True, "start", True)
        assert st["clock_ms"] == WINDOW_START - 1
        assert st["closed_candles"] == {"BTCUSDT": 0, "ETHUSDT": 0}
        assert (st["market_trades"], st["requests_in_flight"]) == (0, 0)
        assert await market.sync(1) == []
        await market.close()


async def test_a_resume_of_another_barrier_is_refused_and_changes_nothing() -> None:
    async with lockstep(hours=0.05) as (http, url, _):
        market = Market(await http.ws_connect(f"{url}/stream?streams={STREAMS}"))
        before = await at_barrier(http, url, 1)
        for wrong in (0, 2, -1):
            code, body = await resume(http, url, json.dumps({"barrier": wrong}))
            assert (code, body) == (409, {"ok": False, "barrier": 1, "paused": True})
        for bad in ("not json", "{}", '{"barrier": "one"}', "[1]", "null", ""):
            code, body = await resume(http, url, bad)
            assert code == 400, bad
            assert body["ok"] is False and "barrier" in body["error"]
        after = await status(http, url)
        assert after == before
        assert await market.sync(1) == []
        await market.close()


async def test_each_resume_advances_one_barrier_until_the_window_is_done() -> None:
    # three minutes, no orders: start, then one barrier after each minute's closes
    async with lockstep(hours=0.05) as (http, url, sim):
        market = Market(await http.ws_connect(f"{url}/stream?streams={STREAMS}"))
        await at_barrier(http, url, 1)
        for minute in range(3):
            barrier = minute + 1
            assert await resume(http, url, json.dumps({"barrier": barrier})) == (200, {"ok": True})
            st = await at_barrier(http, url, barrier + 1)
            assert st["pause_phase"] == "closes"
            assert st["closed_candles"] == {"BTCUSDT": minute + 1, "ETHUSDT": minute + 1}
            assert st["clock_ms"] == WINDOW_START + (minute + 1) * MIN - 1
            assert (st["requests_in_flight"], st["unsent_frames"]) == (0, 0)
            frames = await market.sync(barrier)
            # this minute's closes went out, and nothing of the next minute
            opens = [WINDOW_START + m * MIN for m in range(minute + 1)]
            assert closed(frames) == [(s, t) for t in opens for s in ("BTCUSDT", "ETHUSDT")]
            assert max(f["E"] for f in frames) == WINDOW_START + (minute + 1) * MIN - 1
            # the barrier just passed is not waited at any more
            code, _ = await resume(http, url, json.dumps({"barrier": barrier}))
            assert code == 409
        assert st["done"] is True  # the last minute's closes are out: nothing is left
        assert await resume(http, url, json.dumps({"barrier": 4})) == (200, {"ok": True})
        assert sim.replay_task is not None
        await asyncio.wait_for(asyncio.shield(sim.replay_task), DEADLINE_S)
        st = await status(http, url)
        assert (st["done"], st["paused"], st["barrier"]) == (True, False, 4)
        code, body = await resume(http, url, json.dumps({"barrier": 5}))
        assert (code, body) == (409, {"ok": False, "barrier": 4, "paused": False})
        await market.close()


def reached_first_in_a_later_minute() -> tuple[int, Decimal]:
    """A minute ``k > 0`` of BTCUSDT whose low is below every price before it (the first
    open and the earlier lows): a BUY limit there rests until minute ``k`` fills it."""
    candles = read_csv("BTCUSDT", 60, WINDOW_START)
    lowest = min(Decimal(candles[0][1]), Decimal(candles[0][3]))
    for k, c in enumerate(candles[1:], start=1):
        if Decimal(c[3]) < lowest:
            return k, Decimal(c[3])
        lowest = min(lowest, Decimal(c[3]))
    raise AssertionError("no new low within the hour")


async def test_a_minute_that_fills_an_order_pauses_before_its_closes() -> None:
    k, price = reached_first_in_a_later_minute()
    qty = Decimal("0.00100")
    async with lockstep(hours=(k + 2) / 60) as (http, url, _):
        lk = (await (await http.post(url + "/api/v3/userDataStream")).json())["listenKey"]
        user = await http.ws_connect(f"{url}/ws/{lk}")
        reports: list[dict[str, Any]] = []

        async def read_user() -> None:
            async for msg in user:
                reports.append(json.loads(msg.data))

        reader = asyncio.create_task(read_user())
        market = Market(await http.ws_connect(f"{url}/stream?streams={STREAMS}"))
        await at_barrier(http, url, 1)
        r = await http.post(
            url + "/api/v3/order",
            data=sign(
                {
                    "symbol": "BTCUSDT",
                    "side": "BUY",
                    "type": "LIMIT",
                    "timeInForce": "GTC",
                    "quantity": str(qty),
                    "price": str(price),
                    "newClientOrderId": "lock-1",
                }
            ),
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert r.status == 200, await r.text()
        orders = await (await http.get(url + "/sim/orders")).json()
        assert orders == [
            {
                "symbol": "BTCUSDT",
                "clientOrderId": "lock-1",
                "status": "NEW",
                "executedQty": "0.00000000",
            }
        ]
        st = await status(http, url)
        assert (st["requests_in_flight"], st["unsent_frames"]) == (0, 0)
        # the minutes before k: one barrier each, after their closes
        for barrier in range(1, k + 1):
            assert (await resume(http, url, json.dumps({"barrier": barrier})))[0] == 200
            st = await at_barrier(http, url, barrier + 1)
            assert (st["pause_phase"], st["fills"]) == ("closes", 0)
        # minute k's trades filled the order: a barrier before its closes go out
        assert (await resume(http, url, json.dumps({"barrier": k + 1})))[0] == 200
        st = await at_barrier(http, url, k + 2)
        assert (st["pause_phase"], st["fills"]) == ("trades", 1)
        assert st["closed_candles"] == {"BTCUSDT": k, "ETHUSDT": k}
        assert st["clock_ms"] < WINDOW_START + (k + 1) * MIN - 1
        frames = await market.sync(k + 2)
        assert (("BTCUSDT", WINDOW_START + k * MIN)) not in closed(frames)
        assert any(f["e"] == "trade" and Decimal(f["p"]) <= price for f in frames)
        await until(lambda: any(e.get("x") == "TRADE" for e in reports))
        trade = next(e for e in reports if e.get("x") == "TRADE")
        assert (trade["c"], trade["X"], Decimal(trade["l"])) == ("lock-1", "FILLED", qty)
        orders = await (await http.get(url + "/sim/orders")).json()
        assert [(o["clientOrderId"], o["status"], o["executedQty"]) for o in orders] == [
            ("lock-1", "FILLED", "0.00100000")
        ]
        # then the closes of minute k, and their own barrier
        assert (await resume(http, url, json.dumps({"barrier": k + 2})))[0] == 200
        st = await at_barrier(http, url, k + 3)
        assert (st["pause_phase"], st["fills"]) == ("closes", 1)
        assert st["closed_candles"] == {"BTCUSDT": k + 1, "ETHUSDT": k + 1}
        frames = await market.sync(k + 3)
        assert closed(frames)[-2:] == [
            ("BTCUSDT", WINDOW_START + k * MIN),
            ("ETHUSDT", WINDOW_START + k * MIN),
        ]
        await market.close()
        await user.close()
        reader.cancel()
