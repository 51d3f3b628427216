"""Risk engine: each rule, cancels, executions and idempotency (pure, no I/O)."""

from __future__ import annotations

from decimal import Decimal
from itertools import count

import msgspec
import pytest

from gridstream.common.binance.filters import SymbolFilters
from gridstream.common.messages import (
    Actions,
    IntentAction,
    OrderAccepted,
    OrderApproved,
    OrderCanceled,
    OrderFailed,
    OrderFilled,
    OrderIntent,
    OrderRejected,
    Side,
)
from gridstream.core.portfolio import FillBook, book_from_fills
from gridstream.core.risk import OpenOrder, Reasons, RiskEngine, verdict_id

_ids = count(1)
D = Decimal


def btc_filters() -> SymbolFilters:
    # The real BTCUSDT values of the recorded exchangeInfo (see libs/common fixtures).
    return SymbolFilters(
        symbol="BTCUSDT",
        base_asset="BTC",
        quote_asset="USDT",
        tick_size=D("0.01"),
        min_price=D("0.01"),
        max_price=D("1000000"),
        step_size=D("0.00001"),
        min_qty=D("0.00001"),
        max_qty=D("9000"),
        min_notional=D("10"),
    )


def engine(max_exposure: str = "250") -> RiskEngine:
    return RiskEngine({"BTCUSDT": btc_filters()}, max_exposure_quote=D(max_exposure))


def intent(
    side: Side = "BUY",
    price: str = "70000",
    qty: str = "0.001",
    *,
    symbol: str = "BTCUSDT",
    action: IntentAction = Actions.PLACE,
    coid: str | None = None,
    intent_id: str | None = None,
) -> OrderIntent:
    n = next(_ids)
    return OrderIntent(
        id=intent_id or f"intent-{n}",
        ts_event=1_000 + n,
        ts_init=1_000 + n,
        action=action,  # type: ignore[arg-type]
        symbol=symbol,
        client_order_id=coid or f"gs-{n}",
        side=side,
        price=D(price),
        qty=D(qty),
    )


def fill(
    coid: str,
    side: Side,
    qty: str,
    price: str = "70000",
    trade_id: int = 1,
    *,
    fee: str = "0",
    fee_asset: str = "BNB",
) -> OrderFilled:
    return OrderFilled(
        id=f"simulator:BTCUSDT:trade:{trade_id}",
        ts_event=1,
        ts_init=1,
        symbol="BTCUSDT",
        client_order_id=coid,
        venue_order_id="9",
        trade_id=str(trade_id),
        side=side,
        price=D(price),
        qty=D(qty),
        fee=D(fee),
        fee_asset=fee_asset,
        liquidity="maker",
        venue="simulator",
    )


def rejected_reason(v: OrderApproved | OrderRejected) -> str:
    assert isinstance(v, OrderRejected), v
    return v.reason


def test_valid_buy_is_approved_and_counted() -> None:
    e = engine()
    it = intent(price="70000.01", qty="0.001")
    v = e.on_intent(it)
    assert isinstance(v, OrderApproved)
    assert v.id == verdict_id(it.id)
    assert v.intent_id == it.id
    assert (v.price, v.qty, v.client_order_id) == (it.price, it.qty, it.client_order_id)
    assert e.open_notional("BTCUSDT", "BUY") == D("70.00001")


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"symbol": "DOGEUSDT"}, Reasons.UNKNOWN_SYMBOL),
        ({"price": "0"}, Reasons.PRICE_FILTER),
        ({"price": "-1"}, Reasons.PRICE_FILTER),
        ({"price": "70000.005"}, Reasons.PRICE_FILTER),
        ({"qty": "0.0010001"}, Reasons.LOT_SIZE),
        ({"qty": "0"}, Reasons.LOT_SIZE),
        ({"qty": "0.0001"}, Reasons.NOTIONAL),
        ({"qty": "0.004"}, Reasons.MAX_EXPOSURE),
        ({"side": "SELL"}, Reasons.INSUFFICIENT_POSITION),
    ],
)
def test_each_rule_rejects(kwargs: dict[str, str], reason: str) -> None:
    e = engine()
    v = e.on_intent(intent(**kwargs))  # type: ignore[arg-type]
    assert rejected_reason(v) == reason
    assert isinstance(v, OrderRejected) and v.detail
    assert e.open_orders == {}


def test_market_orders_are_refused_unless_the_venue_path_takes_them() -> None:
    market = msgspec.structs.replace(intent(), order_type="MARKET")
    assert rejected_reason(engine().on_intent(market)) == Reasons.ORDER_TYPE
    both = RiskEngine(
        {"BTCUSDT": btc_filters()}, max_exposure_quote=D("250"), order_types=("LIMIT", "MARKET")
    )
    assert isinstance(both.on_intent(market), OrderApproved)


def test_rule_order_price_before_lot_before_notional() -> None:
    e = engine()
    assert rejected_reason(e.on_intent(intent(price="1.001", qty="0.0000001"))) == "PRICE_FILTER"
    assert rejected_reason(e.on_intent(intent(price="1", qty="0.0000001"))) == "LOT_SIZE"


def test_exposure_counts_position_and_open_buys() -> None:
    e = engine("250")
    assert isinstance(e.on_intent(intent(qty="0.001", coid="a")), OrderApproved)  # 70
    assert isinstance(e.on_intent(intent(qty="0.001", coid="b")), OrderApproved)  # 140
    e.on_execution(fill("a", "BUY", "0.001"))  # position 0.001 (70), open buys 70
    assert e.position("BTCUSDT") == D("0.001")
    assert e.open_notional("BTCUSDT", "BUY") == D("70.000")
    # 70 held + 70 open + 105 = 245 <= 250
    assert isinstance(e.on_intent(intent(qty="0.0015", coid="c")), OrderApproved)
    # now 70 + 175 + 14 = 259 > 250
    assert rejected_reason(e.on_intent(intent(qty="0.0002", coid="d"))) == "MAX_EXPOSURE"
    # the position is valued at the intent price: a lower price leaves room
    assert isinstance(e.on_intent(intent(price="20000", qty="0.0005", coid="e")), OrderApproved)


def test_sells_limited_to_position_minus_open_sells() -> None:
    e = engine()
    e.on_execution(fill("x", "BUY", "0.003"))
    assert isinstance(e.on_intent(intent("SELL", qty="0.002", coid="s1")), OrderApproved)
    assert rejected_reason(e.on_intent(intent("SELL", qty="0.002", coid="s2"))) == (
        "INSUFFICIENT_POSITION"
    )
    assert isinstance(e.on_intent(intent("SELL", qty="0.001", coid="s3")), OrderApproved)
    e.on_execution(fill("s1", "SELL", "0.002", trade_id=2))
    assert e.position("BTCUSDT") == D("0.001")
    assert "s1" not in e.open_orders


def test_a_fee_in_the_base_asset_reduces_what_risk_lets_you_sell() -> None:
    e = engine()
    # bought 0.003 BTC, the venue kept 0.000003 BTC of it as the fee: 0.002997 held
    e.on_execution(fill("x", "BUY", "0.003", fee="0.000003", fee_asset="BTC"))
    assert e.position("BTCUSDT") == D("0.002997")
    assert rejected_reason(e.on_intent(intent("SELL", qty="0.003", coid="s1"))) == (
        "INSUFFICIENT_POSITION"
    )
    assert isinstance(e.on_intent(intent("SELL", qty="0.00299", coid="s2")), OrderApproved)
    # a fee in the quote asset (or BNB) leaves the quantity alone
    e.on_execution(fill("y", "BUY", "0.001", trade_id=2, fee="0.07", fee_asset="USDT"))
    e.on_execution(fill("z", "BUY", "0.001", trade_id=3, fee="0.0001", fee_asset="BNB"))
    assert e.position("BTCUSDT") == D("0.004997")


def test_same_intent_twice_gives_same_verdict_and_counts_once() -> None:
    e = engine()
    it = intent(qty="0.002")
    first = e.on_intent(it)
    second = e.on_intent(it)
    assert first == second
    assert e.open_notional("BTCUSDT", "BUY") == D("140.000")
    # a rejected intent also stays rejected with the same id
    bad = intent(qty="0.003")
    r1 = e.on_intent(bad)
    assert rejected_reason(r1) == "MAX_EXPOSURE"
    assert e.on_intent(bad) == r1


def test_same_client_order_id_from_new_intent_not_double_counted() -> None:
    e = engine()
    assert isinstance(e.on_intent(intent(qty="0.002", coid="lvl-1")), OrderApproved)
    assert isinstance(e.on_intent(intent(qty="0.002", coid="lvl-1")), OrderApproved)
    assert e.open_notional("BTCUSDT", "BUY") == D("140.000")


def test_cancel_known_order_approved_unknown_rejected() -> None:
    e = engine()
    e.on_intent(intent(coid="o1"))
    v = e.on_intent(intent(action=Actions.CANCEL, coid="o1"))
    assert isinstance(v, OrderApproved)
    assert v.action == Actions.CANCEL
    assert "o1" in e.open_orders  # only the venue's cancel removes it
    assert (
        rejected_reason(e.on_intent(intent(action=Actions.CANCEL, coid="nope"))) == "UNKNOWN_ORDER"
    )


def test_executions_update_open_orders() -> None:
    e = engine()
    e.on_intent(intent(coid="o1", qty="0.002"))
    e.on_intent(intent(coid="o2"))
    e.on_intent(intent(coid="o3"))
    e.on_execution(
        OrderCanceled(
            id="c",
            ts_event=1,
            ts_init=1,
            symbol="BTCUSDT",
            client_order_id="o2",
            venue_order_id="2",
        )
    )
    e.on_execution(
        OrderFailed(
            id="f",
            ts_event=1,
            ts_init=1,
            symbol="BTCUSDT",
            client_order_id="o3",
            action=Actions.PLACE,
            code=-2010,
            reason="x",
        )
    )
    assert set(e.open_orders) == {"o1"}
    # partial fill reduces remaining; the same fill twice counts once
    f = fill("o1", "BUY", "0.0005", trade_id=10)
    e.on_execution(f)
    e.on_execution(f)
    assert e.position("BTCUSDT") == D("0.0005")
    assert e.open_orders["o1"].remaining == D("0.0015")
    # an order learned from the venue (e.g. placed before a restart) is tracked
    e.on_execution(
        OrderAccepted(
            id="a",
            ts_event=1,
            ts_init=1,
            symbol="BTCUSDT",
            client_order_id="o9",
            venue_order_id="9",
            side="BUY",
            price=D("60000"),
            qty=D("0.001"),
        )
    )
    assert e.open_orders["o9"] == OpenOrder("BTCUSDT", "BUY", D("60000"), D("0.001"))


def test_restore_from_ledger_state() -> None:
    e = engine()
    f = fill("old", "BUY", "0.002", trade_id=5)
    row = {
        "venue": "simulator",
        "symbol": "BTCUSDT",
        "trade_id": "5",
        "side": "BUY",
        "price": D("70000"),
        "qty": D("0.002"),
        "fee": D("0"),
        "fee_asset": "BNB",
    }
    e.restore(
        book_from_fills([row], assets=e.assets),
        {"o1": OpenOrder("BTCUSDT", "BUY", D("70000"), D("0.001"))},
    )
    e.on_execution(f)  # already in the ledger: not counted again
    assert e.position("BTCUSDT") == D("0.002")
    # 140 held + 70 open + 70 = 280 > 250
    assert rejected_reason(e.on_intent(intent(qty="0.001"))) == "MAX_EXPOSURE"


def accepted(coid: str, qty: str, price: str = "50000", side: Side = "BUY") -> OrderAccepted:
    return OrderAccepted(
        id=f"simulator:BTCUSDT:order:{coid}:NEW",
        ts_event=1,
        ts_init=1,
        symbol="BTCUSDT",
        client_order_id=coid,
        venue_order_id=coid,
        side=side,
        price=D(price),
        qty=D(qty),
    )


def test_accept_after_full_fill_does_not_reopen_the_order() -> None:
    e = engine()  # limit 250
    first = intent(price="50000", qty="0.002", coid="g1")  # 100
    assert isinstance(e.on_intent(first), OrderApproved)
    # the fill goes out through the executor's outbox at once ...
    e.on_execution(fill("g1", "BUY", "0.002", price="50000", trade_id=21))
    # ... the handler's accept is committed later with its batch (and may come again)
    e.on_execution(accepted("g1", "0.002"))
    e.on_execution(accepted("g1", "0.002"))
    assert e.open_orders == {}
    # held 100 + this 100 = 200 <= 250 (with the order re-opened: 300 > 250)
    assert isinstance(e.on_intent(intent(price="50000", qty="0.002")), OrderApproved)


def test_accept_after_cancel_or_failure_does_not_reopen() -> None:
    e = engine()
    e.on_intent(intent(price="50000", qty="0.002", coid="c1"))
    e.on_intent(intent(price="50000", qty="0.002", coid="f1"))
    e.on_execution(
        OrderCanceled(
            id="c",
            ts_event=1,
            ts_init=1,
            symbol="BTCUSDT",
            client_order_id="c1",
            venue_order_id="1",
        )
    )
    e.on_execution(
        OrderFailed(
            id="f",
            ts_event=1,
            ts_init=1,
            symbol="BTCUSDT",
            client_order_id="f1",
            action=Actions.PLACE,
            code=-2010,
            reason="x",
        )
    )
    e.on_execution(accepted("c1", "0.002"))
    e.on_execution(accepted("f1", "0.002"))
    assert e.open_orders == {}
    # a new intent reusing a done client order id is answered, not counted
    assert isinstance(e.on_intent(intent(price="50000", qty="0.002", coid="c1")), OrderApproved)
    assert e.open_orders == {}


def test_accept_of_an_unknown_order_counts_what_is_left_after_its_fills() -> None:
    e = engine()
    e.on_execution(fill("u1", "BUY", "0.0015", price="50000", trade_id=31))
    e.on_execution(accepted("u1", "0.002"))
    assert e.open_orders["u1"].remaining == D("0.0005")
    e.on_execution(fill("u2", "BUY", "0.002", price="50000", trade_id=32))
    e.on_execution(accepted("u2", "0.002"))  # already fully filled: closed
    assert "u2" not in e.open_orders


def test_closed_memory_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from gridstream.core import risk as risk_engine

    monkeypatch.setattr(risk_engine, "CLOSED_MEMORY", 3)
    e = engine()
    for n in range(5):
        coid = f"b{n}"
        e.on_intent(intent(price="50000", qty="0.0002", coid=coid))
        e.on_execution(fill(coid, "BUY", "0.0002", price="50000", trade_id=40 + n))
    assert list(e.closed) == ["b2", "b3", "b4"]


def test_restore_closed_orders_and_verdicts() -> None:
    e = engine()
    it = intent(price="50000", qty="0.002", coid="r1")
    first = engine().on_intent(it)
    e.restore(FillBook(), {}, closed=["done-1"], verdicts=[first])
    e.on_execution(accepted("done-1", "0.002"))  # filled before the restart: stays closed
    assert e.open_orders == {}
    assert e.on_intent(it) == first  # the same verdict, not judged again
