"""Strategy wiring against real Redis and Postgres: signals/verdicts/executions in, intents out."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from decimal import Decimal

import asyncpg
import pytest
import redis.asyncio as aioredis

from gridstream.common import codec, db
from gridstream.common.binance.filters import parse_exchange_info
from gridstream.common.bus import Consumer, Delivery, Producer
from gridstream.common.messages import (
    AnyMessage,
    OrderAccepted,
    OrderFilled,
    OrderIntent,
    OrderRejected,
    Regime,
    Signal,
)
from gridstream.common.settings import SettingsError, load_settings
from gridstream.common.streams import Kind, Service, consumer, group, stream
from gridstream.core.strategies.grid import client_order_id
from gridstream.simulator.server import start as start_simulator
from gridstream.simulator.settings import load_sim_settings
from gridstream.strategy.main import StrategyService, StrategySettings, amain

SYMBOL = "BTCUSDT"
T0 = 1_774_267_740_000
D = Decimal


def signal(
    i: int,
    *,
    ema: float = 70_000.0,
    close: str = "70000",
    atr: float = 20.0,
    regime: Regime = "range",
    interval: str = "1m",
) -> Signal:
    open_time = T0 + i * 60_000
    return Signal(
        id=f"signal:{SYMBOL}:{interval}:{open_time}",
        ts_event=(open_time + 60_000) * 10**6,
        ts_init=(open_time + 60_000) * 10**6,
        symbol=SYMBOL,
        interval=interval,
        open_time=open_time,
        close=D(close),
        ema=ema,
        atr=atr,
        volatility=0.001,
        trend=0.0,
        regime=regime,
    )


def settings_for(
    redis_url: str, database_url: str, venue_rest_url: str = "http://127.0.0.1:9"
) -> StrategySettings:
    return StrategySettings(
        redis_url=redis_url,
        database_url=database_url,
        venue_rest_url=venue_rest_url,
        symbols=[SYMBOL],
        block_ms=20,
        metrics_port=0,
        claim_interval_s=3600,
    )


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    p = await db.create_pool(database_url)
    yield p
    await p.close()


async def publish(redis: aioredis.Redis, kind: Kind, *msgs: AnyMessage) -> None:
    await Producer(redis).publish((stream(kind, SYMBOL), m) for m in msgs)


async def intents(redis: aioredis.Redis) -> list[OrderIntent]:
    out = []
    for _eid, fields in await redis.xrange(stream(Kind.INTENTS, SYMBOL)):
        msg = codec.decode(fields[codec.FIELD])
        assert isinstance(msg, OrderIntent)
        out.append(msg)
    return out


async def drain(redis: aioredis.Redis, service: StrategyService) -> None:
    c = Consumer(
        redis,
        group=group(Service.STRATEGY),
        consumer=consumer(Service.STRATEGY, "0"),
        streams=service.input_streams(),
        handler=service.handle,
        block_ms=20,
        claim_interval_s=3600,
    )
    await c.ensure_groups()
    idle = 0
    while idle < 3:
        idle = 0 if await c.run_once() else idle + 1


async def test_signals_become_intents_and_events_steer_the_next_grid(
    redis: aioredis.Redis, pool: asyncpg.Pool, redis_url: str, database_url: str
) -> None:
    service = StrategyService(settings_for(redis_url, database_url))
    await service.restore(pool)
    # a warm-up signal and a signal of another interval do nothing; a range signal places
    await publish(
        redis, Kind.SIGNALS, signal(0, regime="warmup"), signal(0, interval="5m"), signal(1)
    )
    await drain(redis, service)
    first = await intents(redis)
    # no inventory yet: three buys, 25 bps (175.00) apart, below the EMA
    assert [(i.action, i.side, i.price) for i in first] == [
        ("place", "BUY", D("69825.00")),
        ("place", "BUY", D("69650.00")),
        ("place", "BUY", D("69475.00")),
    ]
    assert all(i.qty == D("0.00028") for i in first[:1])

    # risk rejects level 3; the venue accepts and fills level 1
    b1, _b2, b3 = first
    await publish(
        redis,
        Kind.ORDERS,
        OrderRejected(
            id="rej",
            ts_event=1,
            ts_init=1,
            intent_id=b3.id,
            action="place",
            symbol=SYMBOL,
            client_order_id=b3.client_order_id,
            reason="max_exposure",
        ),
    )
    await publish(
        redis,
        Kind.EXECUTIONS,
        OrderAccepted(
            id="acc",
            ts_event=1,
            ts_init=1,
            symbol=SYMBOL,
            client_order_id=b1.client_order_id,
            venue_order_id="1",
            side="BUY",
            price=b1.price,
            qty=b1.qty,
        ),
        OrderFilled(
            id="fill",
            ts_event=1,
            ts_init=1,
            symbol=SYMBOL,
            client_order_id=b1.client_order_id,
            venue_order_id="1",
            trade_id="77",
            side="BUY",
            price=b1.price,
            qty=b1.qty,
            fee=D("0.02"),
            fee_asset="USDT",
            liquidity="maker",
        ),
    )
    # then the same signal again (redelivered duplicate) and the next one
    await publish(redis, Kind.SIGNALS, signal(1))
    await drain(redis, service)
    await publish(redis, Kind.SIGNALS, signal(2))
    await drain(redis, service)
    got = await intents(redis)
    assert got[3:6] == first  # the duplicate signal gives the very same intents
    new = got[6:]
    assert sorted((i.action, i.side, i.level) for i in new) == [
        ("place", "BUY", 1),
        ("place", "BUY", 3),
        ("place", "SELL", 1),
    ]
    assert {i.client_order_id for i in new}.isdisjoint({i.client_order_id for i in first})
    sell = next(i for i in new if i.side == "SELL")
    assert sell.qty <= b1.qty and sell.price == D("70175.00")


def sequence() -> list[AnyMessage]:
    """Signals that move the grid, with risk's verdicts and venue events in between."""
    msgs: list[AnyMessage] = []
    engine_view = StrategyService(settings_for("redis://x", "postgresql://x")).engine
    for i in range(1, 60):
        sig = signal(i, ema=70_000.0 + 40 * (i % 7), close=str(70_000 + 35 * (i % 5)))
        msgs.append(sig)
        for n, intent in enumerate(engine_view.on_signal(sig)):
            if intent.action != "place":
                continue
            if n % 3 == 0:
                msgs.append(
                    OrderRejected(
                        id=f"rej-{intent.client_order_id}",
                        ts_event=sig.ts_event,
                        ts_init=sig.ts_event,
                        intent_id=intent.id,
                        action="place",
                        symbol=SYMBOL,
                        client_order_id=intent.client_order_id,
                        reason="max_exposure",
                    )
                )
            else:
                msgs.append(
                    OrderAccepted(
                        id=f"acc-{intent.client_order_id}",
                        ts_event=sig.ts_event,
                        ts_init=sig.ts_event,
                        symbol=SYMBOL,
                        client_order_id=intent.client_order_id,
                        venue_order_id=str(len(msgs)),
                        side=intent.side,
                        price=intent.price,
                        qty=intent.qty,
                    )
                )
            engine_view.on_message(msgs[-1])
    return msgs


async def test_every_signal_decides_in_order_whatever_the_batch_size(
    redis_url: str, database_url: str
) -> None:
    msgs = sequence()
    assert sum(isinstance(m, Signal) for m in msgs) == 59 and len(msgs) > 100

    async def run(batch: int) -> list[AnyMessage]:
        service = StrategyService(settings_for(redis_url, database_url))
        out: list[AnyMessage] = []
        for start in range(0, len(msgs), batch):
            chunk = [
                Delivery(stream(Kind.SIGNALS, SYMBOL), b"0-0", m, 1)
                for m in msgs[start : start + batch]
            ]
            out += [m for _s, m in await service.handle(chunk)]
        return out

    one, thousand = await run(1), await run(1000)
    assert one == thousand
    # every signal moved the grid: intents for many candles, not only the newest
    assert len({i.id.split(":")[2] for i in one if isinstance(i, OrderIntent)}) > 10


async def test_restart_rebuilds_orders_and_inventory_from_postgres(
    redis: aioredis.Redis, pool: asyncpg.Pool, redis_url: str, database_url: str
) -> None:
    open_buy = client_order_id(SYMBOL, T0, "BUY", 1)
    done_buy = client_order_id(SYMBOL, T0, "BUY", 2)
    rows = [
        (open_buy, "accepted", D("69825.00"), D("0.00028"), D(0)),
        (done_buy, "filled", D("69650.00"), D("0.00028"), D("0.00028")),
        (client_order_id(SYMBOL, T0, "BUY", 3), "canceled", D("69475.00"), D("0.00028"), D(0)),
    ]
    async with pool.acquire() as conn:
        await conn.executemany(
            "INSERT INTO orders (client_order_id, intent_id, venue, symbol, side, price, qty,"
            " status, venue_order_id, filled_qty, ts_created, ts_updated)"
            " VALUES ($1, $1, 'simulator', $2, 'BUY', $3, $4, $5, 'v', $6, 1, 1)",
            [(c, SYMBOL, p, q, s, f) for c, s, p, q, f in rows],
        )
        await conn.execute(
            "INSERT INTO fills (venue, symbol, trade_id, client_order_id, venue_order_id, side,"
            " price, qty, fee, fee_asset, liquidity, ts_event) VALUES"
            " ('simulator', $1, '5', $2, 'v', 'BUY', 69650, 0.0006, 0.0000006, 'BTC', 'maker', 1)",
            SYMBOL,
            done_buy,
        )
    service = StrategyService(settings_for(redis_url, database_url))
    summary = await service.restore(pool)
    assert summary["orders"] == 1 and summary["fills"] == 1
    assert service.engine.inventory[SYMBOL] == D("0.0005994")
    # the fill re-read from the executions stream is not counted again
    await publish(
        redis,
        Kind.EXECUTIONS,
        OrderFilled(
            id="fill5",
            ts_event=1,
            ts_init=1,
            symbol=SYMBOL,
            client_order_id=done_buy,
            venue_order_id="v",
            trade_id="5",
            side="BUY",
            price=D(69650),
            qty=D("0.0006"),
            fee=D("0.0000006"),
            fee_asset="BTC",
            liquidity="maker",
            venue="simulator",  # the same (venue, symbol, trade id) as the ledger's row
        ),
    )
    await publish(redis, Kind.SIGNALS, signal(1))
    await drain(redis, service)
    assert service.engine.inventory[SYMBOL] == D("0.0005994")
    got = await intents(redis)
    # level-1 buy is still live and kept; buys 2 and 3 placed; sells only up to 0.0005994 BTC
    assert open_buy not in {i.client_order_id for i in got}
    assert sorted((i.side, i.level, i.qty) for i in got) == [
        ("BUY", 2, D("0.00028")),
        ("BUY", 3, D("0.00028")),
        ("SELL", 1, D("0.00028")),
        ("SELL", 2, D("0.00028")),
    ]


async def test_service_main_runs_end_to_end(
    redis: aioredis.Redis, redis_url: str, database_url: str
) -> None:
    runner, venue = await start_simulator(load_sim_settings({"GS_SIM_PORT": "0"}))
    task = asyncio.create_task(amain(settings_for(redis_url, database_url, venue)))
    try:
        await publish(redis, Kind.SIGNALS, signal(1))
        got: list[OrderIntent] = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and len(got) < 3:
            assert not task.done(), task
            await asyncio.sleep(0.05)
            got = await intents(redis)
        assert [(i.action, i.side, i.level) for i in got] == [
            ("place", "BUY", 1),
            ("place", "BUY", 2),
            ("place", "BUY", 3),
        ]
        await publish(redis, Kind.SIGNALS, signal(2, regime="high_volatility"))
        while time.monotonic() < deadline and len(got) < 6:
            await asyncio.sleep(0.05)
            got = await intents(redis)
        assert [i.action for i in got[3:]] == ["cancel"] * 3
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await runner.cleanup()


def test_venue_filters_set_tick_and_step_unless_a_setting_overrides_them() -> None:
    filters = parse_exchange_info(
        {
            "symbols": [
                {
                    "symbol": "ETHUSDT",
                    "baseAsset": "ETH",
                    "quoteAsset": "USDT",
                    "filters": [
                        {
                            "filterType": "PRICE_FILTER",
                            "minPrice": "0.01",
                            "maxPrice": "1000000",
                            "tickSize": "0.01",
                        },
                        {
                            "filterType": "LOT_SIZE",
                            "minQty": "0.0001",
                            "maxQty": "9000",
                            "stepSize": "0.0001",
                        },
                    ],
                }
            ]
        }
    )
    params = StrategySettings().params(filters)
    assert params.step("ETHUSDT") == D("0.0001")
    assert params.tick("ETHUSDT") == D("0.01")
    assert params.step("BTCUSDT") == D("0.00001")  # not listed by the venue: the default
    overridden = StrategySettings(step_sizes=["ETHUSDT:0.001"]).params(filters)
    assert overridden.step("ETHUSDT") == D("0.001")


def test_settings_from_env_and_invalid_values_named() -> None:
    s = load_settings(
        StrategySettings,
        {
            "GS_LEVELS": "5",
            "GS_ORDER_QUOTE": "25.5",
            "GS_TICK_SIZES": "ETHUSDT:0.01,BTCUSDT:0.1",
        },
    )
    p = s.params()
    assert (p.levels, p.order_quote, p.tick("BTCUSDT"), p.tick("SOLUSDT")) == (
        5,
        D("25.5"),
        D("0.1"),
        D("0.01"),
    )
    with pytest.raises(SettingsError, match="GS_LEVELS"):
        load_settings(StrategySettings, {"GS_LEVELS": "0"})
    with pytest.raises(SettingsError, match="GS_TICK_SIZES"):
        load_settings(StrategySettings, {"GS_TICK_SIZES": "BTCUSDT"})
    with pytest.raises(SettingsError, match="GS_ORDER_QUOTE"):
        load_settings(StrategySettings, {"GS_ORDER_QUOTE": "abc"})
