"""GridEngine: grid shape, spacing, rounding, inventory, minimal diff, ids, regimes, events."""

from __future__ import annotations

from decimal import Decimal

import pytest

from gridstream.common.messages import (
    OrderAccepted,
    OrderCanceled,
    OrderFailed,
    OrderFilled,
    OrderIntent,
    OrderRejected,
    Regime,
    Side,
    Signal,
)
from gridstream.core.strategies.grid import (
    CLIENT_ID_RE,
    GridEngine,
    GridParams,
    client_order_id,
    parse_level,
)

T0 = 1_774_267_740_000
D = Decimal


def signal(
    i: int = 0,
    *,
    close: str = "100",
    ema: float = 100.0,
    atr: float = 0.1,
    regime: Regime = "range",
    symbol: str = "BTCUSDT",
) -> Signal:
    open_time = T0 + i * 60_000
    return Signal(
        id=f"signal:{symbol}:1m:{open_time}",
        ts_event=(open_time + 60_000) * 1_000_000,
        ts_init=(open_time + 60_000) * 1_000_000,
        symbol=symbol,
        interval="1m",
        open_time=open_time,
        close=D(close),
        ema=ema,
        atr=atr,
        volatility=0.001,
        trend=0.0,
        regime=regime,
    )


def fill(
    coid: str,
    qty: str,
    *,
    side: Side = "BUY",
    trade: str = "t1",
    fee: str = "0",
    fee_asset: str = "USDT",
    price: str = "100",
) -> OrderFilled:
    return OrderFilled(
        id=f"fill:{trade}",
        ts_event=1,
        ts_init=1,
        symbol="BTCUSDT",
        client_order_id=coid,
        venue_order_id="v1",
        trade_id=trade,
        side=side,
        price=D(price),
        qty=D(qty),
        fee=D(fee),
        fee_asset=fee_asset,
        liquidity="maker",
    )


def engine_with_inventory(qty: str = "10", **kwargs: object) -> GridEngine:
    eng = GridEngine(GridParams(**kwargs))  # type: ignore[arg-type]
    eng.on_message(fill("external", qty, trade="seed"))
    return eng


def places(intents: list[OrderIntent]) -> list[OrderIntent]:
    return [i for i in intents if i.action == "place"]


def cancels(intents: list[OrderIntent]) -> list[OrderIntent]:
    return [i for i in intents if i.action == "cancel"]


def prices(intents: list[OrderIntent], side: Side) -> list[Decimal]:
    return sorted(i.price for i in intents if i.side == side)


def test_grid_is_symmetric_around_the_ema() -> None:
    eng = engine_with_inventory()
    out = eng.on_signal(signal())
    # spacing = max(2 x 0.1, 25 bps of 100 = 0.25, 2 x 10 bps + tick = 0.21) = 0.25
    assert prices(out, "BUY") == [D("99.25"), D("99.50"), D("99.75")]
    assert prices(out, "SELL") == [D("100.25"), D("100.50"), D("100.75")]
    assert all(i.action == "place" for i in out)
    assert sorted((i.side, i.level) for i in out) == [
        ("BUY", 1),
        ("BUY", 2),
        ("BUY", 3),
        ("SELL", 1),
        ("SELL", 2),
        ("SELL", 3),
    ]
    for b, s in zip(prices(out, "BUY")[::-1], prices(out, "SELL"), strict=True):
        assert D(100) - b == s - D(100)


@pytest.mark.parametrize(
    ("atr", "params", "spacing"),
    [
        (1.0, {}, D("2.00")),  # ATR x 2 dominates
        (0.1, {}, D("0.25")),  # min spacing bps dominates
        (0.0, {"min_spacing_bps": D(0)}, D("0.21")),  # floor: 2 x fee + one tick
        (0.10123, {"min_spacing_bps": D(0), "fee_bps": D(0)}, D("0.21")),  # ceil to the tick
    ],
)
def test_spacing(atr: float, params: dict[str, Decimal], spacing: Decimal) -> None:
    eng = GridEngine(GridParams(**params))  # type: ignore[arg-type]
    grid = eng.grid(signal(atr=atr))
    assert grid.spacing == spacing
    assert [lv.price for lv in grid.levels if lv.side == "BUY"] == [
        D(100) - k * spacing for k in (1, 2, 3)
    ]


def test_prices_on_ticks_and_quantities_rounded_down_to_the_step() -> None:
    eng = engine_with_inventory(tick_size=D("0.1"), qty_step=D("0.001"), order_quote=D("20"))
    grid = eng.grid(signal(ema=100.04, atr=0.16, close="100.0"))
    assert grid.centre == D("100.0")
    assert grid.spacing == D("0.4")  # 0.32 -> 0.4 on a 0.1 tick
    for lv in grid.levels:
        assert lv.price % D("0.1") == 0
        assert lv.qty % D("0.001") == 0
        assert lv.qty <= D(20) / lv.price < lv.qty + D("0.001")
    buy1 = next(lv for lv in grid.levels if lv.side == "BUY" and lv.level == 1)
    assert (buy1.price, buy1.qty) == (D("99.6"), D("0.200"))


def test_per_symbol_tick_sizes() -> None:
    eng = GridEngine(GridParams(tick_sizes={"ETHUSDT": D("0.5")}))
    grid = eng.grid(signal(symbol="ETHUSDT", ema=100.3, atr=0.1))
    assert grid.centre == D("100.5")
    assert grid.spacing == D("1.0")  # 2 x 10 bps + one 0.5 tick = 0.7 -> 1.0


def test_buys_and_sells_rest_on_their_side_of_the_book() -> None:
    eng = engine_with_inventory()
    # strong up-move: close well above the EMA; buys stay below the close, sells above it
    out = eng.on_signal(signal(close="100.60", ema=100.0))
    # spacing 25 bps of 100.60 -> 0.26; sells at 100.26 and 100.52 would cross the book
    assert prices(out, "BUY") == [D("99.22"), D("99.48"), D("99.74")]
    assert prices(out, "SELL") == [D("100.78")]


def test_sells_are_limited_by_the_inventory_held() -> None:
    eng = GridEngine()
    assert prices(eng.on_signal(signal(0)), "SELL") == []
    # buy 0.45 BTC, fee paid in BTC: 0.44955 held; 0.19950 + 0.19900 fit, a third does not
    eng.on_message(fill("external", "0.45", fee="0.00045", fee_asset="BTC", trade="x1"))
    assert eng.inventory["BTCUSDT"] == D("0.44955")
    out = eng.on_signal(signal(1))
    sells = [i for i in out if i.side == "SELL"]
    assert [(i.price, i.qty) for i in sells] == [
        (D("100.25"), D("0.19950")),
        (D("100.50"), D("0.19900")),
    ]
    # the same fill redelivered is not counted twice
    eng.on_message(fill("external", "0.45", fee="0.00045", fee_asset="BTC", trade="x1"))
    assert eng.inventory["BTCUSDT"] == D("0.44955")


def test_diff_is_minimal() -> None:
    eng = engine_with_inventory()
    # ATR 0.15 x 2 = 0.30 dominates the minimum spacing throughout
    first = eng.on_signal(signal(0, atr=0.15))
    assert prices(first, "BUY") == [D("99.10"), D("99.40"), D("99.70")]
    assert len(places(first)) == 6
    # a move below half a spacing changes nothing
    assert eng.on_signal(signal(1, ema=100.1, close="100.10", atr=0.15)) == []
    # the centre moves up by one spacing: the outer buy and the inner sell go,
    # one buy and one sell come, the four others stay
    out = eng.on_signal(signal(2, ema=100.3, close="100.30", atr=0.15))
    assert sorted((i.side, i.price) for i in cancels(out)) == [
        ("BUY", D("99.10")),
        ("SELL", D("100.30")),
    ]
    assert sorted((i.side, i.price) for i in places(out)) == [
        ("BUY", D("100.00")),
        ("SELL", D("101.20")),
    ]
    assert out.index(cancels(out)[-1]) < out.index(places(out)[0])  # cancels first
    # a cancel already requested is not requested again
    assert eng.on_signal(signal(3, ema=100.3, close="100.30", atr=0.15)) == []


def test_same_signal_twice_gives_identical_intents_and_ids() -> None:
    a, b = engine_with_inventory(), engine_with_inventory()
    out1 = a.on_signal(signal(5))
    out2 = a.on_signal(signal(5))
    assert out1 == out2 and out1
    assert b.on_signal(signal(5)) == out1  # a fresh engine in the same state agrees
    assert len({i.client_order_id for i in out1}) == len(out1)
    assert len({i.id for i in out1}) == len(out1)
    for i in out1:
        assert CLIENT_ID_RE.match(i.client_order_id)
        assert i.ts_event == signal(5).ts_event
    # an older signal after a newer one is ignored
    a.on_signal(signal(6))
    assert a.on_signal(signal(5)) == []


def test_client_order_ids_fit_binance_rules() -> None:
    coid = client_order_id("BTCUSDT", T0, "BUY", 3)
    assert coid == "gs-BTCUSDT-mn357a00-b3"
    assert int(coid.split("-")[2], 36) == T0
    assert parse_level(coid) == ("BUY", 3)
    long = client_order_id("1000SATSFDUSDTOOLONG", 2**45, "SELL", 12)
    assert CLIENT_ID_RE.match(long) and len(long) <= 36
    assert parse_level(long) == ("SELL", 12)
    assert parse_level("web_123") is None


def test_high_volatility_cancels_everything_and_places_nothing() -> None:
    eng = engine_with_inventory()
    placed = eng.on_signal(signal(0))
    out = eng.on_signal(signal(1, regime="high_volatility"))
    assert places(out) == []
    assert sorted(i.client_order_id for i in out) == sorted(i.client_order_id for i in placed)
    assert {i.reason for i in out} == {"high_volatility"}
    assert eng.on_signal(signal(2, regime="high_volatility")) == []


def test_warmup_does_nothing() -> None:
    eng = engine_with_inventory()
    assert eng.on_signal(signal(0, regime="warmup")) == []
    assert eng.live("BTCUSDT") == []


def test_order_events_update_the_live_orders() -> None:
    eng = GridEngine()
    out = eng.on_signal(signal(0))
    buys = {i.level: i for i in out}
    b1, b2, b3 = buys[1], buys[2], buys[3]
    # risk rejects level 1; the venue accepts 2 and fills it fully in two trades; 3 is canceled
    eng.on_message(
        OrderRejected(
            id="r1",
            ts_event=1,
            ts_init=1,
            intent_id=b1.id,
            action="place",
            symbol="BTCUSDT",
            client_order_id=b1.client_order_id,
            reason="max_exposure",
        )
    )
    for i in (b2, b3):
        eng.on_message(
            OrderAccepted(
                id=f"a{i.level}",
                ts_event=1,
                ts_init=1,
                symbol="BTCUSDT",
                client_order_id=i.client_order_id,
                venue_order_id="v",
                side="BUY",
                price=i.price,
                qty=i.qty,
            )
        )
    half = b2.qty / 2
    eng.on_message(fill(b2.client_order_id, str(half), trade="f1", price=str(b2.price)))
    assert b2.client_order_id in {o.client_order_id for o in eng.live("BTCUSDT")}
    eng.on_message(fill(b2.client_order_id, str(b2.qty - half), trade="f2", price=str(b2.price)))
    eng.on_message(
        OrderCanceled(
            id="c3",
            ts_event=1,
            ts_init=1,
            symbol="BTCUSDT",
            client_order_id=b3.client_order_id,
            venue_order_id="v",
        )
    )
    assert eng.live("BTCUSDT") == []
    assert eng.inventory["BTCUSDT"] == b2.qty
    # an old acceptance re-read later does not bring a closed order back
    eng.on_message(
        OrderAccepted(
            id="a2",
            ts_event=1,
            ts_init=1,
            symbol="BTCUSDT",
            client_order_id=b2.client_order_id,
            venue_order_id="v",
            side="BUY",
            price=b2.price,
            qty=b2.qty,
        )
    )
    assert eng.live("BTCUSDT") == []
    # the next signal places the three buys again (new ids) and a sell for the inventory
    again = eng.on_signal(signal(1))
    assert sorted(i.level for i in again if i.side == "BUY") == [1, 2, 3]
    assert not {i.client_order_id for i in again} & {b1.client_order_id, b2.client_order_id}
    assert [i.level for i in again if i.side == "SELL"] == [1]


def test_failed_cancel_is_requested_again_on_the_next_signal() -> None:
    eng = GridEngine()
    eng.on_signal(signal(0))
    first = eng.on_signal(signal(1, regime="high_volatility"))
    target = first[0]
    eng.on_message(
        OrderFailed(
            id="f",
            ts_event=1,
            ts_init=1,
            symbol="BTCUSDT",
            client_order_id=target.client_order_id,
            action="cancel",
            code=-1003,
            reason="rate limit",
        )
    )
    out = eng.on_signal(signal(2, regime="high_volatility"))
    assert [i.client_order_id for i in out] == [target.client_order_id]
    assert out[0].id != target.id


def test_unknown_accepted_grid_order_is_adopted() -> None:
    eng = GridEngine()
    coid = client_order_id("BTCUSDT", T0 - 60_000, "BUY", 1)
    eng.on_message(
        OrderAccepted(
            id="a",
            ts_event=1,
            ts_init=1,
            symbol="BTCUSDT",
            client_order_id=coid,
            venue_order_id="v",
            side="BUY",
            price=D("99.75"),
            qty=D("0.2005"),
        )
    )
    eng.on_message(
        OrderAccepted(
            id="b",
            ts_event=1,
            ts_init=1,
            symbol="BTCUSDT",
            client_order_id="manual-1",
            venue_order_id="v",
            side="BUY",
            price=D("90"),
            qty=D("1"),
        )
    )
    assert [o.client_order_id for o in eng.live("BTCUSDT")] == [coid]
    out = eng.on_signal(signal(0))
    # the adopted order sits on level 1: only levels 2 and 3 are placed on the buy side
    assert prices(out, "BUY") == [D("99.25"), D("99.50")]


@pytest.mark.parametrize("kwargs", [{"levels": 0}, {"order_quote": D(0)}, {"fee_bps": D(-1)}])
def test_invalid_params_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        GridParams(**kwargs)  # type: ignore[arg-type]
