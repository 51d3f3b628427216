"""Order lifecycle over a real server: REST + user data stream + market replay crossing."""

from __future__ import annotations

import asyncio
import json
from decimal import Decimal
from typing import Any

import aiohttp
from sim_helpers import KEY, WINDOW_START, assert_same_shape, fixture, read_csv, settings, sign

from gridstream.simulator.server import start

H = {"X-MBX-APIKEY": KEY}


async def next_event(ws: aiohttp.ClientWebSocketResponse, pred: Any, timeout: float = 20) -> Any:
    async with asyncio.timeout(timeout):
        while True:
            msg = await ws.receive()
            assert msg.type == aiohttp.WSMsgType.TEXT, msg
            data = json.loads(msg.data)
            if pred(data):
                return data


async def test_limit_order_rests_then_fills_on_replay() -> None:
    runner, url = await start(settings(hours=1.0, speed=0.0))
    try:
        candles = read_csv("BTCUSDT", 60, WINDOW_START)
        first_open = Decimal(candles[0][1])
        low = min(Decimal(c[3]) for c in candles)
        assert low < first_open
        price, qty = low, Decimal("0.00100")
        async with aiohttp.ClientSession(headers=H) as http:
            lk = (await (await http.post(url + "/api/v3/userDataStream")).json())["listenKey"]
            assert (await http.put(url + "/api/v3/userDataStream", params={"listenKey": lk})).ok
            user = await http.ws_connect(f"{url}/ws/{lk}")
            body = sign(
                {
                    "symbol": "BTCUSDT",
                    "side": "BUY",
                    "type": "LIMIT",
                    "timeInForce": "GTC",
                    "quantity": str(qty),
                    "price": str(price),
                    "newClientOrderId": "grid-1",
                }
            )
            r = await http.post(
                url + "/api/v3/order",
                data=body,
                headers={"Content-Type": "application/x-www-form-urlencoded"},
            )
            order = await r.json()
            assert r.status == 200, order
            assert order["status"] == "NEW"
            new = await next_event(user, lambda d: d["e"] == "executionReport")
            assert (new["x"], new["X"], new["c"], new["i"]) == (
                "NEW",
                "NEW",
                "grid-1",
                order["orderId"],
            )
            doc_er = fixture("executionReport.json")["event"]
            assert_same_shape(new, doc_er, optional=frozenset({"v"}))
            pos = await next_event(user, lambda d: d["e"] == "outboundAccountPosition")
            assert_same_shape(pos, fixture("outboundAccountPosition.json")["event"])
            assert pos["B"] == [
                {"a": "USDT", "f": f"{700 - price * qty:.8f}", "l": f"{price * qty:.8f}"}
            ]
            oo = await (await http.get(url + "/api/v3/openOrders?" + sign({}))).json()
            assert [o["clientOrderId"] for o in oo] == ["grid-1"]
            # a market-data client starts the replay clock
            market = await http.ws_connect(
                url + "/stream?streams=btcusdt@trade/btcusdt@kline_1m/btcusdt@aggTrade"
            )
            frames: list[dict[str, Any]] = []

            async def drain() -> None:
                async for m in market:
                    frames.append(json.loads(m.data))

            drainer = asyncio.create_task(drain())
            trade = await next_event(user, lambda d: d.get("x") == "TRADE", timeout=30)
            assert_same_shape(trade, doc_er, optional=frozenset({"v"}))
            assert (trade["X"], trade["m"], trade["N"]) == ("FILLED", True, "BTC")
            assert Decimal(trade["L"]) == price
            assert Decimal(trade["l"]) == qty
            fee = qty * Decimal("0.001")
            assert Decimal(trade["n"]) == fee
            pos = await next_event(user, lambda d: d["e"] == "outboundAccountPosition")
            bal = {b["a"]: (Decimal(b["f"]), Decimal(b["l"])) for b in pos["B"]}
            assert bal["USDT"] == (Decimal(700) - price * qty, Decimal(0))
            assert bal["BTC"] == (qty - fee, Decimal(0))
            acct = await (await http.get(url + "/api/v3/account?" + sign({}))).json()
            acct_bal = {b["asset"]: Decimal(b["free"]) for b in acct["balances"]}
            assert acct_bal["USDT"] == Decimal(700) - price * qty
            assert acct_bal["BTC"] == qty - fee
            mt = await (
                await http.get(url + "/api/v3/myTrades?" + sign({"symbol": "BTCUSDT"}))
            ).json()
            assert_same_shape(mt, fixture("GET_api_v3_myTrades.json"))
            assert mt[0]["id"] == trade["t"]
            assert mt[0]["isMaker"] is True
            fills = await (await http.get(url + "/sim/fills")).json()
            assert fills[0]["clientOrderId"] == "grid-1"
            assert fills[0]["commissionAsset"] == "BTC"
            oo = await (await http.get(url + "/api/v3/openOrders?" + sign({}))).json()
            assert oo == []
            # market frames: exact field sets of the docs, combined-stream envelope
            async with asyncio.timeout(20):
                while not any(f["data"]["e"] == "kline" and f["data"]["k"]["x"] for f in frames):
                    await asyncio.sleep(0.01)
            by = {}
            for f in frames:
                assert set(f) == {"stream", "data"}
                by.setdefault((f["data"]["e"], f["data"].get("k", {}).get("x")), f["data"])
            assert_same_shape(by[("trade", None)], fixture("trade.json"))
            assert_same_shape(by[("aggTrade", None)], fixture("aggTrade.json"))
            assert_same_shape(by[("kline", False)], fixture("kline.json"))
            assert_same_shape(by[("kline", True)], fixture("ws_kline.json")["data"])
            trades = [f["data"] for f in frames if f["data"]["e"] == "trade"]
            assert trades[0]["T"] == WINDOW_START
            ids = [t["t"] for t in trades]
            assert ids == sorted(set(ids))
            await market.close()
            drainer.cancel()
            await user.close()
    finally:
        await runner.cleanup()


async def test_replay_at_speed_takes_wall_time_and_reports_done() -> None:
    # 3 minutes of data at 600x: ~0.3 s wall
    runner, url = await start(settings(hours=0.05, speed=600.0, wait_for_clients=False))
    try:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        async with aiohttp.ClientSession() as http:
            async with asyncio.timeout(60):
                while not (await (await http.get(url + "/sim/status")).json())["done"]:
                    await asyncio.sleep(0.02)
            assert loop.time() - t0 >= 0.25
            st = await (await http.get(url + "/sim/status")).json()
            assert st["clock_ms"] == WINDOW_START + 3 * 60_000 - 1
            kl = await (
                await http.get(url + "/api/v3/klines?symbol=ETHUSDT&interval=1m&limit=3")
            ).json()
            assert kl[-1][0] == WINDOW_START + 2 * 60_000
            assert (await http.get(url + "/api/v3/ping")).status == 200
    finally:
        await runner.cleanup()
