"""REST against a real server: payload shapes vs recorded Binance payloads, auth, errors."""

from __future__ import annotations

import time
from decimal import Decimal
from typing import Any

import pytest
import requests
from sim_helpers import (
    KEY,
    WINDOW_START,
    assert_same_shape,
    fixture,
    read_csv,
    sign,
)

from gridstream.simulator.server import ThreadedSimulator

H = {"X-MBX-APIKEY": KEY}


def get(sim: ThreadedSimulator, path: str, **params: Any) -> requests.Response:
    return requests.get(sim.url + path, params=params, timeout=10)


def signed(
    sim: ThreadedSimulator, method: str, path: str, params: dict[str, Any], **kw: Any
) -> requests.Response:
    q = sign(params, **kw)
    if method == "POST":
        return requests.post(
            sim.url + path,
            data=q,
            headers={**H, "Content-Type": "application/x-www-form-urlencoded"},
            timeout=10,
        )
    return requests.request(method, f"{sim.url}{path}?{q}", headers=H, timeout=10)


def error(resp: requests.Response) -> tuple[int, str]:
    assert resp.status_code in (400, 401), resp.text
    body = resp.json()
    assert set(body) == {"code", "msg"}
    return body["code"], body["msg"]


def catalog_messages(code: int) -> list[str]:
    for c in fixture("error-codes-catalog.json")["codes"]:
        if c["code"] == code:
            return list(c["messages"])
    return []


def test_ping_time_exchange_info(sim: ThreadedSimulator) -> None:
    r = get(sim, "/api/v3/ping")
    assert r.json() == fixture("GET_api_v3_ping.json")
    assert int(r.headers["X-MBX-USED-WEIGHT-1M"]) >= 1
    before = int(time.time() * 1000)
    t = get(sim, "/api/v3/time").json()
    assert_same_shape(t, fixture("GET_api_v3_time.json"))
    assert before <= t["serverTime"] <= int(time.time() * 1000) + 1  # the wall clock, now
    info = get(sim, "/api/v3/exchangeInfo").json()
    doc = fixture("GET_api_v3_exchangeInfo.json")
    assert set(info) == set(doc) - {"sors"}
    assert [s["symbol"] for s in info["symbols"]] == ["BTCUSDT", "ETHUSDT"]
    assert_same_shape(info["symbols"][0], doc["symbols"][0], optional=frozenset({"filters"}))
    # filter values are the real recorded ones
    rec = {s["symbol"]: s for s in fixture("http_spot_market_exchange_info.json")["symbols"]}
    for s in info["symbols"]:
        mine = {f["filterType"]: f for f in s["filters"]}
        real = {f["filterType"]: f for f in rec[s["symbol"]]["filters"]}
        assert mine["PRICE_FILTER"] == real["PRICE_FILTER"]
        assert mine["LOT_SIZE"] == real["LOT_SIZE"]
        assert mine["NOTIONAL"]["minNotional"] == real["MIN_NOTIONAL"]["minNotional"]
    one = get(sim, "/api/v3/exchangeInfo", symbol="ETHUSDT").json()
    assert [s["symbol"] for s in one["symbols"]] == ["ETHUSDT"]
    assert error(get(sim, "/api/v3/exchangeInfo", symbol="DOGEUSDT"))[0] == -1121


def test_klines_shape_and_paging(sim: ThreadedSimulator) -> None:
    rows = read_csv("BTCUSDT", 1500, WINDOW_START - 86_400_000)
    rec = fixture("http_spot_market_klines.json")
    got = get(sim, "/api/v3/klines", symbol="BTCUSDT", interval="1m").json()
    assert len(got) == 500  # default limit, the latest closed ones
    assert got[-1][6] == WINDOW_START - 1  # nothing from the replay's future
    assert_same_shape(got, rec)
    assert_same_shape(got, fixture("GET_api_v3_klines.json"))
    s0 = int(rows[0][0])
    got = get(
        sim, "/api/v3/klines", symbol="BTCUSDT", interval="1m", startTime=s0, limit=1000
    ).json()
    assert len(got) == 1000
    assert [r[0] for r in got] == [int(r[0]) for r in rows[:1000]]
    assert [r[1:6] for r in got[:3]] == [[f"{Decimal(x):.8f}" for x in r[1:6]] for r in rows[:3]]
    assert got[0][8] == 8
    got = get(
        sim, "/api/v3/klines", symbol="BTCUSDT", interval="1m", startTime=s0, limit=5000
    ).json()
    assert len(got) == 1000  # max limit
    got = get(
        sim,
        "/api/v3/klines",
        symbol="BTCUSDT",
        interval="1m",
        startTime=s0 + 1,
        endTime=int(rows[4][0]),
    ).json()
    assert [r[0] for r in got] == [int(r[0]) for r in rows[1:5]]
    got = get(sim, "/api/v3/klines", symbol="BTCUSDT", interval="1m", startTime=WINDOW_START).json()
    assert got == []  # the future is not served
    assert error(get(sim, "/api/v3/klines", symbol="BTCUSDT", interval="7m"))[0] == -1120
    assert error(get(sim, "/api/v3/klines", symbol="BTCUSDT"))[0] == -1102


@pytest.mark.parametrize(
    ("case", "code"),
    [
        ("bad-signature", -1022),
        ("stale", -1021),
        ("ahead", -1021),
        ("no-key", -2014),
        ("wrong-key", -2015),
        ("no-timestamp", -1102),
        ("big-recv-window", -1102),
    ],
)
def test_signed_request_errors(sim: ThreadedSimulator, case: str, code: int) -> None:
    now = int(time.time() * 1000)
    url = sim.url + "/api/v3/account"
    headers = dict(H)
    if case == "bad-signature":
        q = sign({"recvWindow": 5000}, secret="nope")
    elif case == "stale":
        q = sign({}, ts=now - 10_000)
    elif case == "ahead":
        q = sign({}, ts=now + 5_000)
    elif case == "no-key":
        q, headers = sign({}), {}
    elif case == "wrong-key":
        q, headers = sign({}), {"X-MBX-APIKEY": "other"}
    elif case == "no-timestamp":
        q = "recvWindow=5000&signature=00"
    else:
        q = sign({"recvWindow": 70000})
    c, msg = error(requests.get(f"{url}?{q}", headers=headers, timeout=10))
    assert c == code
    assert any(msg == m or "%s" in m for m in catalog_messages(code)), msg


def test_stale_timestamp_inside_recv_window_is_fine(sim: ThreadedSimulator) -> None:
    q = sign({"recvWindow": 60000}, ts=int(time.time() * 1000) - 30_000)
    r = requests.get(f"{sim.url}/api/v3/account?{q}", headers=H, timeout=10)
    assert r.status_code == 200


def test_order_responses_and_errors(sim: ThreadedSimulator) -> None:
    base = {"symbol": "ETHUSDT", "side": "BUY", "type": "LIMIT", "timeInForce": "GTC"}
    first_open = Decimal(read_csv("ETHUSDT", 1, WINDOW_START)[0][1])
    px = str((first_open * Decimal("0.9")).quantize(Decimal("0.01")))
    docs = {
        "FULL": fixture("POST_api_v3_order.FULL.json"),
        "RESULT": fixture("POST_api_v3_order.RESULT.json"),
        "ACK": fixture("POST_api_v3_order.ACK.json"),
    }
    ids = []
    for rt, doc in docs.items():
        r = signed(
            sim,
            "POST",
            "/api/v3/order",
            {**base, "price": px, "quantity": "0.01", "newOrderRespType": rt},
        )
        assert r.status_code == 200, r.text
        body = r.json()
        if rt == "FULL":
            assert body["fills"] == []
            assert body["status"] == "NEW"
            doc = {**doc, "fills": []}
        assert_same_shape(body, doc)
        ids.append(body["orderId"])
    oo = signed(sim, "GET", "/api/v3/openOrders", {"symbol": "ETHUSDT"}).json()
    assert [o["orderId"] for o in oo] == ids
    assert_same_shape(oo, fixture("GET_api_v3_openOrders.json"))
    one = signed(sim, "GET", "/api/v3/order", {"symbol": "ETHUSDT", "orderId": ids[0]}).json()
    assert_same_shape(one, fixture("GET_api_v3_order.json"))
    acct = signed(sim, "GET", "/api/v3/account", {}).json()
    assert_same_shape(acct, fixture("GET_api_v3_account.json"))
    usdt = next(b for b in acct["balances"] if b["asset"] == "USDT")
    locked = Decimal(px) * Decimal("0.01") * 3
    assert Decimal(usdt["locked"]) == locked
    assert Decimal(usdt["free"]) == Decimal(700) - locked
    cancel = signed(sim, "DELETE", "/api/v3/order", {"symbol": "ETHUSDT", "orderId": ids[0]})
    assert cancel.status_code == 200, cancel.text
    assert_same_shape(cancel.json(), fixture("DELETE_api_v3_order.json"))
    assert cancel.json()["status"] == "CANCELED"
    for oid in ids[1:]:
        signed(sim, "DELETE", "/api/v3/order", {"symbol": "ETHUSDT", "orderId": oid})
    acct = signed(sim, "GET", "/api/v3/account", {}).json()
    usdt = next(b for b in acct["balances"] if b["asset"] == "USDT")
    assert (Decimal(usdt["free"]), Decimal(usdt["locked"])) == (Decimal(700), Decimal(0))
    # errors
    cases = [
        ({**base, "price": px + "1", "quantity": "0.01"}, -1013, "Filter failure: PRICE_FILTER"),
        ({**base, "price": px, "quantity": "0.00001"}, -1013, "Filter failure: LOT_SIZE"),
        ({**base, "price": "100.00", "quantity": "0.01"}, -1013, "Filter failure: NOTIONAL"),
        (
            {**base, "price": px, "quantity": "5"},
            -2010,
            "Account has insufficient balance for requested action.",
        ),
        (
            {**base, "type": "LIMIT_MAKER", "price": str(first_open * 2), "quantity": "0.01"}
            | {"timeInForce": ""},
            -2010,
            "Order would immediately match and take.",
        ),
        ({**base, "quantity": "0.01"}, -1102, None),
        ({**base, "symbol": "FOOBAR", "price": px, "quantity": "1"}, -1121, "Invalid symbol."),
    ]
    for params, code, msg in cases:
        params = {k: v for k, v in params.items() if v != ""}
        c, m = error(signed(sim, "POST", "/api/v3/order", params))
        assert c == code, (params, m)
        if msg:
            assert m == msg
    dup = {**base, "price": px, "quantity": "0.01", "newClientOrderId": "dup-1"}
    assert signed(sim, "POST", "/api/v3/order", dup).status_code == 200
    assert error(signed(sim, "POST", "/api/v3/order", dup)) == (-2010, "Duplicate order sent.")
    signed(sim, "DELETE", "/api/v3/order", {"symbol": "ETHUSDT", "origClientOrderId": "dup-1"})
    assert error(
        signed(sim, "DELETE", "/api/v3/order", {"symbol": "ETHUSDT", "orderId": 999999})
    ) == (-2011, "Unknown order sent.")
    assert error(signed(sim, "GET", "/api/v3/order", {"symbol": "ETHUSDT", "orderId": 999999})) == (
        -2013,
        "Order does not exist.",
    )


def test_admin_endpoints(sim: ThreadedSimulator) -> None:
    st = get(sim, "/sim/status").json()
    assert st["window_start_ms"] == WINDOW_START
    assert st["window_end_ms"] == WINDOW_START + 3_600_000
    assert st["done"] is False
    assert st["started"] is False
    assert isinstance(get(sim, "/sim/fills").json(), list)
    assert any(b["asset"] == "USDT" for b in get(sim, "/sim/balances").json())
