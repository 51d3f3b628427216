"""The portfolio and its FillBook: fees in their own asset, each trade once, the ledger's rows."""

from __future__ import annotations

from decimal import Decimal

import pytest

from gridstream.common.messages import OrderFilled, Side
from gridstream.core.portfolio import FillBook, Portfolio, book_from_fills, split_symbol

D = Decimal


def row(
    trade: str,
    side: Side,
    price: str,
    qty: str,
    fee: str = "0",
    fee_asset: str = "USDT",
    *,
    symbol: str = "BTCUSDT",
    venue: str = "simulator",
) -> dict[str, object]:
    """One ledger ``fills`` row (the columns ``SELECT_FILLS`` reads)."""
    return {
        "venue": venue,
        "symbol": symbol,
        "trade_id": trade,
        "side": side,
        "price": D(price),
        "qty": D(qty),
        "fee": D(fee),
        "fee_asset": fee_asset,
    }


def filled(r: dict[str, object]) -> OrderFilled:
    """The ``OrderFilled`` message of the same trade."""
    return OrderFilled(
        id=f"fill:{r['trade_id']}",
        ts_event=1,
        ts_init=1,
        symbol=str(r["symbol"]),
        client_order_id="gs-x",
        venue_order_id="v",
        trade_id=str(r["trade_id"]),
        side=r["side"],  # type: ignore[arg-type]
        price=r["price"],  # type: ignore[arg-type]
        qty=r["qty"],  # type: ignore[arg-type]
        fee=r["fee"],  # type: ignore[arg-type]
        fee_asset=str(r["fee_asset"]),
        liquidity="maker",
        venue=str(r["venue"]),
    )


ROWS = [
    row("1", "BUY", "60000", "0.002", "0.000002", "BTC"),
    row("2", "BUY", "58000", "0.001", "0.058", "USDT"),
    row("3", "SELL", "61000", "0.0015", "0.0001", "BNB"),
]


def test_split_symbol() -> None:
    assert split_symbol("BTCUSDT") == ("BTC", "USDT")
    assert split_symbol("ETHBTC") == ("ETH", "BTC")
    assert split_symbol("XYZ") == ("XYZ", "")


def test_fees_in_their_own_asset() -> None:
    book = book_from_fills(ROWS, quote="USDT", cash=D("1000"))
    pos = book.portfolio.positions["BTCUSDT"]
    # 0.002 - 0.000002 (fee) + 0.001 - 0.0015
    assert pos.qty == D("0.001498")
    assert pos.fees_by_asset == {"BTC": D("0.000002"), "USDT": D("0.058"), "BNB": D("0.0001")}
    assert book.portfolio.fees_paid == pos.fees_by_asset
    pf = book.portfolio
    assert pf.balance("BTC") == pos.qty
    assert pf.balance("BNB") == D("-0.0001")  # a third asset: out of its own balance
    assert pf.balance("USDT") == D(1000) - D(120) - D(58) - D("0.058") + D("91.5")
    # in the quote asset: equity - start = realised + unrealised - fees (BNB not valued)
    book.mark("BTCUSDT", D("62000"))
    parts = pf.realised() + pf.unrealised() - pf.fees()
    assert abs(pf.equity() - 1000 - parts) < D("1e-20")  # average cost divides: 28 digits


def test_each_trade_once_and_messages_equal_rows() -> None:
    from_rows = book_from_fills(ROWS)
    live = FillBook()
    for r in ROWS:
        assert live.on_fill(filled(r))
        assert not live.on_fill(filled(r))  # redelivered: not counted again
    assert from_rows.apply_rows(ROWS) == 0  # the ledger's rows again: nothing new
    assert not from_rows.on_fill(filled(ROWS[0]))  # the stream's copy of a ledger fill
    a, b = from_rows.portfolio.positions["BTCUSDT"], live.portfolio.positions["BTCUSDT"]
    assert (a.qty, a.cost, a.realised, a.fees) == (b.qty, b.cost, b.realised, b.fees)
    assert from_rows.portfolio.balances == live.portfolio.balances
    assert not from_rows.cash_known  # fills alone: balances are the fills' flows only
    # another venue's trade with the same id is another trade
    assert live.on_fill(filled(row("1", "BUY", "60000", "0.001", venue="testnet")))


def test_forget_takes_a_symbol_out_and_a_rebuild_gives_it_back() -> None:
    eth = row("9", "BUY", "3000", "0.1", "0.3", "USDT", symbol="ETHUSDT")
    book = book_from_fills([*ROWS, eth])
    before = (dict(book.portfolio.balances), dict(book.portfolio.fees_paid))
    eth_qty = book.qty("ETHUSDT")
    book.forget("BTCUSDT")
    assert book.qty("BTCUSDT") == 0 and book.qty("ETHUSDT") == eth_qty
    assert book.portfolio.balance("USDT") == D("-300.3")  # ETH's flows only
    assert book.apply_rows(ROWS) == 3  # forgotten trades count again on the rebuild
    assert (book.portfolio.balances, book.portfolio.fees_paid) == before


def test_assets_from_the_venue_and_one_quote_per_portfolio() -> None:
    book = FillBook(assets={"1000SATSUSDT": ("1000SATS", "USDT")})
    assert book.position("1000SATSUSDT").base == "1000SATS"
    with pytest.raises(ValueError, match="quote BTC"):
        book.on_fill(filled(row("1", "BUY", "0.05", "1", symbol="ETHBTC")))
    with pytest.raises(ValueError, match="quote"):
        Portfolio.start("USDT", D(1), {"ETHBTC": ("ETH", "BTC")})


def test_account_balances_where_known() -> None:
    book = book_from_fills(ROWS, balances={"USDT": D("500"), "BTC": D("0.001498")})
    assert book.cash_known
    book.mark("BTCUSDT", D("60000"))
    assert book.portfolio.equity() == D("500") + D("0.001498") * 60000
    assert book.qty("BTCUSDT") == D("0.001498")  # positions still from the fills
