"""Binance trading: error classification, parsers (recorded payloads), signed client."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from gridstream.common.binance import trading as t
from gridstream.common.messages import OrderAccepted, OrderCanceled, OrderFailed, OrderFilled

FIXTURES = Path(__file__).parent / "fixtures" / "binance"
VENUE = "binance"


def load(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


def report(**overrides: Any) -> dict[str, Any]:
    """The official-docs executionReport with some fields changed."""
    ev = dict(load("executionReport.json")["event"])
    ev.update(overrides)
    return ev


# -- errors -----------------------------------------------------------------------------------
def test_observed_error_payloads_are_classified() -> None:
    observed = load("observed-error-payloads.json")["observed"]
    kinds = {}
    for item in observed:
        err = t.classify(item["http_status"], item["payload"])
        assert err.code == item["payload"]["code"]
        assert err.msg == item["payload"]["msg"]
        kinds.setdefault(err.code, set()).add(type(err))
    assert kinds[-1021] == {t.TimestampError}
    assert kinds[-2010] == {t.RejectedError}
    assert kinds[-1013] == {t.RejectedError}
    assert kinds[-2011] == {t.UnknownOrderError}
    assert all(issubclass(k, t.DefiniteError) for ks in kinds.values() for k in ks)


def test_status_based_classification() -> None:
    assert isinstance(t.classify(503, "Service Unavailable"), t.UnknownOutcome)
    assert isinstance(t.classify(400, {"code": -1007, "msg": "Timeout"}), t.UnknownOutcome)
    assert not isinstance(t.classify(503, ""), t.DefiniteError)
    limited = t.classify(429, {"code": -1003, "msg": "Too many"}, {"Retry-After": "7"})
    assert isinstance(limited, t.RateLimitedError)
    assert limited.retry_after_s == 7.0
    assert isinstance(t.classify(418, {"code": -1003, "msg": "banned"}), t.RateLimitedError)
    assert isinstance(
        t.classify(400, {"code": -2013, "msg": "Order does not exist."}), t.UnknownOrderError
    )
    assert isinstance(t.classify(401, {"code": -2015, "msg": "Invalid API-key"}), t.AuthError)
    example = load("error-payload-example.json")
    assert isinstance(t.classify(400, example), t.RejectedError)


# -- parsers ----------------------------------------------------------------------------------
def test_execution_report_new_is_accepted() -> None:
    msg = t.parse_execution_report(load("executionReport.json"), venue=VENUE, ts_init=5)
    assert isinstance(msg, OrderAccepted)
    assert msg.symbol == "ETHBTC"
    assert msg.client_order_id == "mUvoqJxFIILMdfAW5iGSOW"
    assert msg.venue_order_id == "4293153"
    assert msg.price == Decimal("0.10264410")
    assert msg.qty == Decimal("1")
    assert msg.ts_event == 1499405658657 * 1_000_000
    assert msg.ts_init == 5
    again = t.parse_execution_report(load("executionReport.json"), venue=VENUE, ts_init=9)
    assert again is not None
    assert again.id == msg.id


def test_recorded_trade_report_is_fill() -> None:
    msg = t.parse_execution_report(
        load("ws_spot_execution_report_binance_us.json"), venue=VENUE, ts_init=1
    )
    assert isinstance(msg, OrderFilled)
    assert msg.trade_id == "88685053"
    assert msg.side == "SELL"
    assert msg.price == Decimal("117290.77")
    assert msg.qty == Decimal("0.00042")
    assert msg.fee == Decimal("0.00492621")
    assert msg.fee_asset == "USD"
    assert msg.liquidity == "taker"
    assert msg.venue == VENUE
    assert msg.id == t.fill_id(VENUE, "BTCUSD", 88685053)


def test_maker_fill_and_cancel_uses_original_client_id() -> None:
    fill = t.parse_execution_report(
        report(
            x="TRADE", X="PARTIALLY_FILLED", t=77, l="0.5", L="0.1026", n="0.0001", N="BNB", m=True
        ),
        venue=VENUE,
        ts_init=0,
    )
    assert isinstance(fill, OrderFilled)
    assert fill.liquidity == "maker"
    cancel = t.parse_execution_report(
        report(x="CANCELED", X="CANCELED", c="cancelReq1", C="mUvoqJxFIILMdfAW5iGSOW", z="0.5"),
        venue=VENUE,
        ts_init=0,
    )
    assert isinstance(cancel, OrderCanceled)
    assert cancel.client_order_id == "mUvoqJxFIILMdfAW5iGSOW"
    assert cancel.filled_qty == Decimal("0.5")
    rejected = t.parse_execution_report(
        report(x="REJECTED", X="REJECTED", r="INSUFFICIENT_BALANCES"), venue=VENUE, ts_init=0
    )
    assert isinstance(rejected, OrderFailed)
    assert rejected.reason == "INSUFFICIENT_BALANCES"
    assert t.parse_execution_report(report(x="REPLACED"), venue=VENUE, ts_init=0) is None
    assert (
        t.parse_execution_report(load("outboundAccountPosition.json"), venue=VENUE, ts_init=0)
        is None
    )


def test_account_position_and_rest_parsers() -> None:
    balances = t.parse_account_position(load("outboundAccountPosition.json"))
    assert balances == {"ETH": t.Balance(Decimal("10000"), Decimal("0"))}
    acct = t.parse_account_balances(load("GET_api_v3_account.json"))
    assert acct["BTC"].free == Decimal("4723846.89208129")
    order = t.parse_order(load("GET_api_v3_order.json"))
    assert order.client_order_id == "myOrder1"
    assert order.is_open
    assert order.price == Decimal("0.1")
    canceled = t.parse_order(load("DELETE_api_v3_order.json"))
    assert canceled.client_order_id == "myOrder1"  # origClientOrderId, not the cancel's id
    assert not canceled.is_open
    trade = load("GET_api_v3_myTrades.json")[0]
    fill = t.parse_trade(trade, client_order_id="myOrder1", venue=VENUE, ts_init=0)
    assert fill.id == t.fill_id(VENUE, "BNBBTC", 28457)
    assert fill.side == "BUY"
    assert fill.fee == Decimal("10.1")
    assert fill.fee_asset == "BNB"
    assert fill.liquidity == "taker"


# -- client against a real local server ------------------------------------------------------
KEY = "test-key"
SECRET = "test-secret-do-not-log"


async def start_server(handler: Any) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}"


def verify(request: web.Request) -> dict[str, str]:
    qs = request.rel_url.raw_query_string
    payload, _, sig = qs.rpartition("&signature=")
    want = hmac.new(SECRET.encode(), payload.encode(), hashlib.sha256).hexdigest()
    assert request.headers["X-MBX-APIKEY"] == KEY
    assert hmac.compare_digest(want, sig)
    return dict(request.query)


async def test_signed_requests_and_error_mapping() -> None:
    seen: list[dict[str, str]] = []
    # far beyond the recvWindow-like tolerance below, which is far beyond any request's
    # latency: an unsynced client is always refused, a synced one never (even under load)
    server_offset_ms = 20_000
    tolerance_ms = 5_000

    async def handler(request: web.Request) -> web.Response:
        if request.path == "/api/v3/time":
            return web.json_response({"serverTime": int(time.time() * 1000) + server_offset_ms})
        params = verify(request)
        seen.append(params)
        if abs(int(params["timestamp"]) - (time.time() * 1000 + server_offset_ms)) > tolerance_ms:
            return web.json_response(
                {"code": -1021, "msg": "Timestamp for this request is outside of the recvWindow."},
                status=400,
            )
        if request.path == "/api/v3/order" and request.method == "POST":
            if params["quantity"] == "0.00001":
                return web.json_response(
                    {"code": -1013, "msg": "Filter failure: NOTIONAL"}, status=400
                )
            body = load("POST_api_v3_order.RESULT.json")
            body["clientOrderId"] = params["newClientOrderId"]
            return web.json_response(body)
        if request.path == "/api/v3/order" and request.method == "DELETE":
            return web.json_response({"code": -2011, "msg": "Unknown order sent."}, status=400)
        if request.path == "/api/v3/openOrders":
            return web.Response(status=502, text="Bad Gateway")
        return web.json_response({}, status=404)

    runner, url = await start_server(handler)
    client = t.TradingClient(url, KEY, SECRET)
    try:
        assert SECRET not in repr(client)
        assert SECRET not in str(client)
        res = await client.new_order(
            symbol="BTCUSDT",
            side="BUY",
            price=Decimal("70000.10"),
            qty=Decimal("0.00100"),
            client_order_id="gs-1",
        )
        # first attempt failed with -1021, the client synced its clock and retried once
        assert len(seen) == 2
        assert abs(client.time_offset_ms - server_offset_ms) < tolerance_ms
        assert res["clientOrderId"] == "gs-1"
        assert seen[-1]["price"] == "70000.10"
        assert seen[-1]["timeInForce"] == "GTC"
        assert seen[-1]["type"] == "LIMIT"
        with pytest.raises(t.RejectedError) as rej:
            await client.new_order(
                symbol="BTCUSDT",
                side="BUY",
                price=Decimal("1"),
                qty=Decimal("0.00001"),
                client_order_id="gs-2",
            )
        assert rej.value.code == -1013
        with pytest.raises(t.UnknownOrderError):
            await client.cancel_order(symbol="BTCUSDT", client_order_id="gs-1")
        with pytest.raises(t.UnknownOutcome):
            await client.open_orders("BTCUSDT")
    finally:
        await client.close()
        await runner.cleanup()
    # the server is gone: connection refused means the request never reached the venue
    c2 = t.TradingClient(url, KEY, SECRET, timeout_s=2)
    try:
        with pytest.raises(t.DefiniteError):
            await c2.account()
    finally:
        await c2.close()
