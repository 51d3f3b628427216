"""Signals service wiring: candles -> :class:`SignalEngine` -> signals.

Consumes ``stream(Kind.CANDLES, sym)`` for every configured symbol, publishes each signal to
``stream(Kind.SIGNALS, sym)``. At start the engine is warmed up from the Postgres ``candles``
table (the last ``GS_WARMUP_CANDLES`` per symbol) so a restart needs no fresh warm-up; warm-up
candles produce no output.

Which candles count as already handled at start: those up to the open time of the newest
signal already on the symbol's signal stream (their signals were published together with the
acknowledgement of their candle). With no signal there yet, those older than the first candle
on the candle stream (a new group reads the stream from its start). Later candles come from
the stream and produce their signals as usual.

Redelivery: a candle whose signal was emitted recently is answered with the very same signal
(same deterministic id), so an entry re-read after a failed commit is not lost.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any

import asyncpg
import msgspec
import redis.asyncio as aioredis

from gridstream.common import codec
from gridstream.common.bus import Delivery, Outgoing
from gridstream.common.messages import AnyMessage, Candle, Signal, deterministic_id
from gridstream.common.runtime import Runtime, load_or_exit, run_service
from gridstream.common.settings import CommonSettings
from gridstream.common.streams import Kind, Service, stream, streams
from gridstream.signals.engine import SignalEngine, SignalParams

log = logging.getLogger("gridstream.signals")

#: How many recent signals are kept to answer redelivered candles identically.
RECENT_SIGNALS = 4096
#: How many newest entries of a signal stream are searched for the last signal of the interval.
LAST_SIGNAL_SCAN = 50


class SignalsSettings(CommonSettings, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Settings of the signals service (env ``GS_<FIELD>``)."""

    interval: str = "1m"
    ema_period: int = 20
    atr_period: int = 14
    vol_window: int = 60
    trend_lookback: int = 5
    trend_threshold: float = 0.25
    high_vol_threshold: float = 0.003
    min_warmup: int = 0
    warmup_candles: int = 1000

    def __post_init__(self) -> None:
        super().__post_init__()
        try:
            params = self.params()
        except ValueError as exc:
            raise ValueError(f"GS_{str(exc).split(':', 1)[0].upper()}: {exc}") from None
        if self.warmup_candles < params.warmup:
            raise ValueError(
                f"GS_WARMUP_CANDLES: must be >= the warm-up of {params.warmup} candles"
            )

    def params(self) -> SignalParams:
        return SignalParams(
            ema_period=self.ema_period,
            atr_period=self.atr_period,
            vol_window=self.vol_window,
            trend_lookback=self.trend_lookback,
            trend_threshold=self.trend_threshold,
            high_vol_threshold=self.high_vol_threshold,
            min_warmup=self.min_warmup,
        )


def candle_from_row(symbol: str, interval: str, row: Mapping[str, Any]) -> Candle:
    """A Candle from a ``candles`` table row (used for warm-up only)."""
    open_time = int(row["open_time"])
    close_time = int(row["close_time"])
    return Candle(
        id=deterministic_id("candle", symbol, interval, open_time),
        ts_event=close_time * 1_000_000,
        ts_init=close_time * 1_000_000,
        symbol=symbol,
        interval=interval,
        open_time=open_time,
        close_time=close_time,
        open=Decimal(str(row["open"])),
        high=Decimal(str(row["high"])),
        low=Decimal(str(row["low"])),
        close=Decimal(str(row["close"])),
        volume=Decimal(str(row["volume"])),
        source="db",
    )


def _decoded(entries: Any) -> list[AnyMessage]:
    """The messages of XRANGE entries that decode (others are skipped)."""
    out: list[AnyMessage] = []
    for _eid, fields in entries or ():
        payload = (fields or {}).get(codec.FIELD)
        if not isinstance(payload, bytes):
            continue
        try:
            out.append(codec.decode(payload))
        except (msgspec.DecodeError, msgspec.ValidationError):
            continue
    return out


class SignalsService:
    """The engine plus what the wiring needs around it (warm-up, redelivery answers)."""

    def __init__(self, settings: SignalsSettings) -> None:
        self.settings = settings
        self.engine = SignalEngine(settings.params())
        self._recent: OrderedDict[tuple[str, str, int], Signal] = OrderedDict()

    # -- warm-up ----------------------------------------------------------------------------
    async def handled_until(self, redis: aioredis.Redis, symbol: str) -> int | None:
        """Open time up to which candles of ``symbol`` count as handled (None: all of them)."""
        newest = await redis.xrevrange(stream(Kind.SIGNALS, symbol), count=LAST_SIGNAL_SCAN)
        for msg in _decoded(newest):
            if isinstance(msg, Signal) and msg.interval == self.settings.interval:
                return msg.open_time
        oldest = await redis.xrange(stream(Kind.CANDLES, symbol), count=LAST_SIGNAL_SCAN)
        for msg in _decoded(oldest):
            if isinstance(msg, Candle) and msg.interval == self.settings.interval:
                return msg.open_time - 1
        return None

    async def warm_up(self, pool: asyncpg.Pool, redis: aioredis.Redis) -> dict[str, int]:
        """Feed each symbol's recent history from Postgres into the engine; outputs dropped."""
        s = self.settings
        counts: dict[str, int] = {}
        for symbol in s.symbols:
            until = await self.handled_until(redis, symbol)
            rows = await pool.fetch(
                "SELECT open_time, close_time, open, high, low, close, volume FROM ("
                " SELECT * FROM candles WHERE symbol = $1 AND interval = $2"
                " AND open_time <= $3 ORDER BY open_time DESC LIMIT $4"
                ") recent ORDER BY open_time",
                symbol,
                s.interval,
                until if until is not None else 2**62,
                s.warmup_candles,
            )
            for row in rows:
                self.engine.on_candle(candle_from_row(symbol, s.interval, row))
            counts[symbol] = len(rows)
            log.info(
                "warmed up %s %s with %d candles (handled until %s; warm-up needs %d)",
                symbol,
                s.interval,
                len(rows),
                until,
                self.engine.warmup,
            )
        return counts

    # -- handling -----------------------------------------------------------------------------
    def _remember(self, sig: Signal) -> None:
        self._recent[(sig.symbol, sig.interval, sig.open_time)] = sig
        while len(self._recent) > RECENT_SIGNALS:
            self._recent.popitem(last=False)

    def on_candle(self, candle: Candle) -> list[Signal]:
        """The engine's answer, or the same signal again for a recently handled candle."""
        out = self.engine.on_candle(candle)
        if out:
            for sig in out:
                self._remember(sig)
            return out
        again = self._recent.get((candle.symbol, candle.interval, candle.open_time))
        return [again] if again is not None else []

    async def handle(self, batch: Sequence[Delivery]) -> list[Outgoing]:
        out: list[Outgoing] = []
        for d in batch:
            msg = d.message
            if not isinstance(msg, Candle) or msg.interval != self.settings.interval:
                continue
            for sig in self.on_candle(msg):
                out.append((stream(Kind.SIGNALS, sig.symbol), sig))
        return out


async def amain(settings: SignalsSettings | None = None) -> None:
    settings = settings or load_or_exit(SignalsSettings)
    rt = Runtime(Service.SIGNALS, settings)
    try:
        await rt.start(database=True)
        if rt.pool is None:
            raise RuntimeError("the signals service needs Postgres for its warm-up")
        service = SignalsService(settings)
        rt.status["warmed_up"] = await service.warm_up(rt.pool, rt.redis)
        await rt.consume(streams(Kind.CANDLES, settings.symbols), service.handle)
    finally:
        await rt.close()


def main() -> None:
    run_service(amain)


if __name__ == "__main__":
    main()
