"""Unmodified python-binance and ccxt against the simulator (only their URLs changed)."""

from __future__ import annotations

import time
from decimal import Decimal
from typing import Any

import ccxt
from binance.async_client import AsyncClient
from binance.client import Client
from sim_helpers import KEY, SECRET, WINDOW_START, read_csv

from gridstream.simulator.server import ThreadedSimulator

BINANCE_HOSTS = (
    "https://api.binance.com",
    "https://fapi.binance.com",
    "https://dapi.binance.com",
    "https://eapi.binance.com",
    "https://papi.binance.com",
)


def ccxt_urls(base: str) -> dict[str, Any]:
    """ccxt's own binance API URL table with every host swapped for the simulator."""
    api = dict(ccxt.binance().urls["api"])
    for k, v in api.items():
        if isinstance(v, str):
            for host in BINANCE_HOSTS:
                if v.startswith(host):
                    api[k] = base + v[len(host) :]
    return {"api": api}


def limit_price(symbol: str) -> str:
    first_open = Decimal(read_csv(symbol, 1, WINDOW_START)[0][1])
    return str((first_open * Decimal("0.8")).quantize(Decimal("0.01")))


def test_python_binance_sync(sim: ThreadedSimulator) -> None:
    client = Client(KEY, SECRET, ping=False)
    client.API_URL = sim.url + "/api"
    assert client.ping() == {}
    before = int(time.time() * 1000)
    server = client.get_server_time()["serverTime"]
    assert before <= server <= int(time.time() * 1000) + 1  # the server's wall clock, now
    kl = client.get_klines(symbol="BTCUSDT", interval=Client.KLINE_INTERVAL_1MINUTE, limit=10)
    assert len(kl) == 10
    assert kl[-1][6] == WINDOW_START - 1
    info = client.get_symbol_info("BTCUSDT")
    assert info is not None
    assert info["baseAsset"] == "BTC"
    order = client.order_limit_buy(
        symbol="BTCUSDT", quantity="0.00100", price=limit_price("BTCUSDT")
    )
    assert order["status"] == "NEW"
    assert order["clientOrderId"].startswith("x-")  # the library's own id prefix
    assert [o["orderId"] for o in client.get_open_orders(symbol="BTCUSDT")] == [order["orderId"]]
    got = client.get_order(symbol="BTCUSDT", orderId=order["orderId"])
    assert got["clientOrderId"] == order["clientOrderId"]
    usdt = client.get_asset_balance(asset="USDT")
    assert Decimal(usdt["locked"]) == Decimal(limit_price("BTCUSDT")) * Decimal("0.001")
    cancel = client.cancel_order(symbol="BTCUSDT", orderId=order["orderId"])
    assert cancel["status"] == "CANCELED"
    assert Decimal(client.get_asset_balance(asset="USDT")["locked"]) == 0
    lk = client.stream_get_listen_key()
    assert isinstance(lk, str)
    client.stream_keepalive(lk)
    client.stream_close(lk)
    client.close_connection()


async def test_python_binance_async(sim: ThreadedSimulator) -> None:
    client = AsyncClient(KEY, SECRET)
    client.API_URL = sim.url + "/api"
    try:
        assert await client.ping() == {}
        kl = await client.get_klines(symbol="ETHUSDT", interval="1m", limit=5)
        assert len(kl) == 5
        acct = await client.get_account()
        assert any(b["asset"] == "USDT" for b in acct["balances"])
        o = await client.create_order(
            symbol="ETHUSDT",
            side="BUY",
            type="LIMIT",
            timeInForce="GTC",
            quantity="0.0100",
            price=limit_price("ETHUSDT"),
        )
        assert o["status"] == "NEW"
        c = await client.cancel_order(symbol="ETHUSDT", orderId=o["orderId"])
        assert c["status"] == "CANCELED"
    finally:
        await client.close_connection()


def test_ccxt(sim: ThreadedSimulator) -> None:
    ex = ccxt.binance({"apiKey": KEY, "secret": SECRET, "urls": ccxt_urls(sim.url)})
    before = int(time.time() * 1000)
    server = ex.fetch_time()
    assert before <= server <= int(time.time() * 1000) + 1
    markets = ex.load_markets()
    m = markets["BTC/USDT"]
    assert m["precision"]["price"] == 0.01
    assert m["limits"]["cost"]["min"] == 10.0
    ohlcv = ex.fetch_ohlcv("BTC/USDT", "1m", limit=5)
    assert len(ohlcv) == 5
    assert ohlcv[-1][0] == WINDOW_START - 60_000
    bal = ex.fetch_balance()
    assert bal["USDT"]["free"] == 700.0
    o = ex.create_order("BTC/USDT", "limit", "buy", 0.001, float(limit_price("BTCUSDT")))
    assert o["status"] == "open"
    assert ex.fetch_balance()["USDT"]["used"] > 0
    assert [x["id"] for x in ex.fetch_open_orders("BTC/USDT")] == [o["id"]]
    c = ex.cancel_order(o["id"], "BTC/USDT")
    assert c["status"] == "canceled"
    assert ex.fetch_balance()["USDT"]["free"] == 700.0
