"""Strategy, risk and ``gridstream status`` hold the same positions: one kernel portfolio.

The same fills (a buy whose fee the venue took in the base asset, a sell with its fee in
the quote asset, a buy with its fee in BNB) are rebuilt from the ledger by each part's own
restore path, and fed as ``OrderFilled`` messages to the live engines; every view gives
the same position, average cost and realised PnL.
"""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal

import asyncpg

from gridstream.cli.status import DERIVED_PLACES, ledger_portfolio
from gridstream.common.binance.filters import SymbolFilters
from gridstream.common.messages import OrderFilled
from gridstream.core.risk import RiskEngine
from gridstream.core.strategies.grid import GridEngine
from gridstream.risk.main import load_state
from gridstream.strategy.main import StrategyService, StrategySettings

D = Decimal
SYMBOL = "BTCUSDT"
VENUE = "simulator"
FILTERS = {SYMBOL: SymbolFilters(symbol=SYMBOL, base_asset="BTC", quote_asset="USDT")}
#: (trade id, side, price, qty, fee, fee asset)
TRADES = [
    ("1", "BUY", D("60000"), D("0.003"), D("0.000003"), "BTC"),
    ("2", "SELL", D("62000"), D("0.001"), D("0.062"), "USDT"),
    ("3", "BUY", D("59000"), D("0.0005"), D("0.00002"), "BNB"),
]
#: 0.003 - 0.000003 (fee) - 0.001 + 0.0005
EXPECTED_QTY = D("0.002497")


def messages() -> list[OrderFilled]:
    return [
        OrderFilled(
            id=f"fill:{VENUE}:{SYMBOL}:{t}",
            ts_event=n,
            ts_init=n,
            symbol=SYMBOL,
            client_order_id=f"gs-{t}",
            venue_order_id=t,
            trade_id=t,
            side=side,  # type: ignore[arg-type]
            price=price,
            qty=qty,
            fee=fee,
            fee_asset=asset,
            liquidity="maker",
            venue=VENUE,
        )
        for n, (t, side, price, qty, fee, asset) in enumerate(TRADES, 1)
    ]


async def test_strategy_risk_and_status_agree_on_positions(redis_url, database_url):
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    assert pool is not None
    try:
        await pool.executemany(
            "INSERT INTO fills (venue, symbol, trade_id, client_order_id, venue_order_id, side,"
            " price, qty, fee, fee_asset, liquidity, ts_event)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 'maker', $11)",
            [
                (VENUE, SYMBOL, m.trade_id, m.client_order_id, m.venue_order_id, m.side)
                + (m.price, m.qty, m.fee, m.fee_asset, m.ts_event)
                for m in messages()
            ],
        )
        # the ledger, through each part's restore path
        risk = RiskEngine(FILTERS)
        await load_state(pool, risk, [SYMBOL])
        settings = StrategySettings(
            redis_url=redis_url, database_url=database_url, symbols=[SYMBOL], metrics_port=0
        )
        strategy = StrategyService(settings, FILTERS)
        await strategy.restore(pool)
        async with pool.acquire() as conn:
            [book] = await ledger_portfolio(conn)
        [shown] = book["positions"]
    finally:
        await pool.close()
    # the stream: the same fills as messages, to fresh engines (and again to the restored)
    live_risk, live_grid = RiskEngine(FILTERS), GridEngine()
    for m in messages():
        live_risk.on_execution(m)
        live_grid.on_message(m)
        risk.on_execution(m)  # already in the ledger: not counted again
        strategy.engine.on_message(m)

    qty = {
        "risk (ledger)": risk.position(SYMBOL),
        "risk (stream)": live_risk.position(SYMBOL),
        "strategy (ledger)": strategy.engine.inventory[SYMBOL],
        "strategy (stream)": live_grid.inventory[SYMBOL],
        "status": D(shown["qty"]),
    }
    assert set(qty.values()) == {EXPECTED_QTY}, qty
    books = [risk.book, live_risk.book, strategy.engine.book, live_grid.book]
    positions = [b.portfolio.positions[SYMBOL] for b in books]
    assert {(p.avg_cost, p.realised) for p in positions} == {
        (positions[0].avg_cost, positions[0].realised)
    }
    # status shows a figure made by division to the ledger's 8 decimals
    places = DERIVED_PLACES
    assert D(shown["avg_cost"]) == positions[0].avg_cost.quantize(places, rounding=ROUND_HALF_UP)
    assert D(shown["realised"]) == positions[0].realised.quantize(places, rounding=ROUND_HALF_UP)
    assert shown["fees_by_asset"] == {"BNB": "0.00002", "BTC": "0.000003", "USDT": "0.062"}
